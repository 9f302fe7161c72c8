"""Ragged batches: forward calls and padded compute, the adapter's ``ragged=`` against Beam's own.

Sequences ``(L, width)`` of continuous lengths through a per-position MLP in a real Beam pipeline
(DirectRunner, in-process; keyed so every output is checked against the element computed alone).
Each configuration reports the model's forward calls, the positions it computed against those the
elements hold (padding overhead), the time spent in ``forward`` and the pipeline's wall time:

* ``beam-batches-of-16``: Beam's default path -- fails, "stack expects each tensor to be equal size";
* ``beam-batch-of-1``: the usual workaround, one call per element;
* ``beam-length-buckets``: Beam 2.77's own length bucketing (``batch_length_fn``, default
  ``batch_bucket_boundaries``, ``max_batch_duration_secs``: stateful batching) with an
  ``inference_fn`` that pads each batch to its longest element -- Beam groups by length range
  but the model still needs one shape per call;
* ``modelshare-bucket``, ``modelshare-pad`` (``max_waste=0.25``), ``modelshare-pad-unbounded``
  (``max_waste=None``): ``SharedModelHandler(..., ragged=...)``, batches of at most 16.

Run: ``python -m benchmarks.studies.ragged_batches [--examples 1000] [--max-length 256]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch  # this study is of PyTorch handlers

CONFIGS = ["beam-batches-of-16", "beam-batch-of-1", "beam-length-buckets", "modelshare-bucket", "modelshare-pad",
           "modelshare-pad-unbounded"]
WIDTH, HIDDEN = 64, 1024
BATCH = 16

#: the file each forward call appends "batch length seconds" to (set by run_config): a file, as Beam
#: pickles ``__main__``'s globals by value and drops metrics set in the timers its stateful batching flushes from
FORWARD_LOG = "MODELSHARE_RAGGED_FORWARD_LOG"


class PerPositionMLP(torch.nn.Module):
    """[batch, length, width] -> [batch, length, width]: compute grows with the positions given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(WIDTH, HIDDEN), torch.nn.GELU(),
                                          torch.nn.Linear(HIDDEN, WIDTH))

    def forward(self, x: Any) -> Any:
        start = time.perf_counter()
        out = self.layers(x)
        with open(os.environ[FORWARD_LOG], "a") as log:
            log.write(f"{x.shape[0]} {x.shape[1]} {time.perf_counter() - start}\n")
        return out


def pad_each_batch(batch: Any, model: Any, device: str, inference_args: Optional[dict] = None,
                   model_id: Optional[str] = None) -> list[Any]:
    """What a user of Beam's length buckets writes: pad the batch to its longest, crop outputs."""
    from apache_beam.ml.inference.base import PredictionResult

    longest = max(x.shape[0] for x in batch)
    padded = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[0])) for x in batch])
    with torch.no_grad():
        out = model(padded, **(inference_args or {}))
    return [PredictionResult(x, out[i, :x.shape[0]], model_id) for i, x in enumerate(batch)]


def _handler(config: str, path: str) -> Any:
    from apache_beam.ml.inference.base import KeyedModelHandler
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    from beam_adapter import Pad, SharedModelHandler

    size = 1 if config == "beam-batch-of-1" else BATCH
    kwargs: dict[str, Any] = dict(state_dict_path=path, model_class=PerPositionMLP, min_batch_size=size,
                                  max_batch_size=size)
    if config == "beam-length-buckets":
        kwargs.update(max_batch_duration_secs=1, batch_length_fn=_keyed_length, inference_fn=pad_each_batch)
    keyed = KeyedModelHandler(PytorchModelHandlerTensor(**kwargs))
    ragged: dict[str, Any] = {"modelshare-bucket": "bucket", "modelshare-pad": Pad(),
                              "modelshare-pad-unbounded": Pad(max_waste=None)}
    return SharedModelHandler(keyed, ragged=ragged[config]) if config in ragged else keyed


def _keyed_length(element: Any) -> int:
    return int(element[1].shape[0])


def run_config(config: str, path: str, n: int, max_length: int) -> dict[str, Any]:
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    from beam_adapter import release_all

    with tempfile.TemporaryDirectory(prefix="ragged-") as name:
        folder = Path(name)
        os.environ[FORWARD_LOG] = str(folder / "forwards")
        start = time.perf_counter()
        try:
            with beam.Pipeline() as pipeline:
                _ = (pipeline | beam.Create(list(range(n))) | beam.Map(_example, n, max_length)
                     | RunInference(_handler(config, path))
                     | beam.Map(_error, n, max_length) | beam.io.WriteToText(str(folder / "errors")))
        except Exception as exc:  # Beam's default path on ragged input: what a user meets
            return {"config": config, "failed": str(exc).splitlines()[0][:90]}
        finally:
            release_all()
        wall = time.perf_counter() - start
        errors = dict(json.loads(line) for f in folder.glob("errors*") for line in f.read_text().splitlines())
        forwards = [line.split() for line in (folder / "forwards").read_text().splitlines()]
    assert sorted(errors) == list(range(n)), f"{config}: {len(errors)} outputs for {n} examples"
    real = sum(int(x.shape[0]) for x in examples(n, max_length)[0])
    return {"config": config, "calls": len(forwards),
            "computed_over_real": sum(int(b) * int(length) for b, length, _ in forwards) / real,
            "forward_s": sum(float(s) for _, _, s in forwards), "wall_s": wall,
            "max_error": max(float(e) for e in errors.values()),
            "wrong_shapes": sum(e == "inf" for e in errors.values())}


def _example(i: int, n: int, max_length: int) -> tuple[int, Any]:
    """Element ``i``, made where it is used: the runner moves indices, not tensors (pickling 1000
    tensors between steps takes the DirectRunner longer than the whole inference)."""
    return i, examples(n, max_length)[0][i]


def _error(keyed: tuple[int, Any], n: int, max_length: int) -> str:
    """How far an output is from its element computed alone (inf: a wrong shape)."""
    i, result = keyed
    expected = examples(n, max_length)[1][i]
    same = result.inference.shape == expected.shape
    return json.dumps([i, float((result.inference - expected).abs().max()) if same else "inf"])


@functools.lru_cache(maxsize=2)
def examples(n: int, max_length: int) -> tuple[list[Any], list[Any]]:
    """``n`` sequences of lengths uniform in [1, max_length), and each one's output computed alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    sequences = [torch.from_numpy(rng.standard_normal((int(length), WIDTH)).astype(np.float32))
                 for length in rng.integers(1, max_length, n)]
    model = PerPositionMLP().eval()
    with torch.no_grad():
        expected = [model.layers(x.unsqueeze(0))[0] for x in sequences]
    return sequences, expected


def main(argv: Optional[list[str]] = None, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "mlp.pt")
        torch.save(PerPositionMLP().state_dict(), path)
        run_config("beam-batch-of-1", path, 20, args.max_length)  # warm-up: imports, first calls
        rows = [run_config(c, path, args.examples, args.max_length) for c in args.configs]
    report(f"{args.examples} sequences (L, {WIDTH}), L uniform in [1, {args.max_length}), per-position MLP, "
           f"batches of at most {BATCH}, DirectRunner in-process\n")
    report("| configuration | forward calls | computed / real positions | forward time | pipeline wall time "
           "| max abs error |")
    report("|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            report(f"| {row['config']} | fails: {row['failed']} | | | | |")
        else:
            wrong = f", {row['wrong_shapes']} wrong shapes" if row["wrong_shapes"] else ""
            report(f"| {row['config']} | {row['calls']} | {row['computed_over_real']:.2f} | {row['forward_s']:.2f} s "
                   f"| {row['wall_s']:.1f} s | {row['max_error']:.1e}{wrong} |")
    report(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
