"""A real Beam pipeline, four ways: Beam's default, Beam's ``large_model=True``, and modelshare's
``SharedModelHandler`` with the frameworks' own thread pools or with threads shared out.

Each configuration runs RunInference over a generated model (a PyTorch MLP, an ONNX MLP, or a
scikit-learn linear classifier with a wide coefficient matrix) on the DirectRunner with
``direct_num_workers`` worker processes (``multi_processing``), in a fresh process; this process
samples the total PSS of that process and all its descendants (the SDK workers, Beam's model
server) every 100 ms and reports the peak, with the wall time of the whole pipeline.

Run: ``python -m benchmarks.studies.beam_pipeline [--framework torch|sklearn|onnx] [--size-mib 256] [--workers 4]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from modelshare.memory import Peak, total_pss

from .. import ROOT
from ..models import MiB

CONFIGS = ["beam-default", "beam-large-model", "modelshare-framework-threads", "modelshare-auto-threads"]

_PIPELINE = """
import json, sys, time
import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from benchmarks.studies.beam_pipeline import handler_for, examples_for
framework, config, path, size_mib, width, workers, examples, batch = sys.argv[1:9]
handler = handler_for(framework, config, path, int(size_mib), int(width), int(batch))
data = examples_for(framework, int(width), int(examples))
start = time.perf_counter()
with beam.Pipeline(options=PipelineOptions(direct_num_workers=int(workers),
                                           direct_running_mode='multi_processing')) as p:
    _ = p | beam.Create(data) | RunInference(handler) | beam.Map(lambda r: r.inference is not None)
print(json.dumps({'wall_s': time.perf_counter() - start}))
"""


def save_model(framework: str, size_mib: int, width: int, folder: Path) -> Path:
    """The generated model, saved the way the framework's Beam handler reads it."""
    if framework == "torch":
        import torch

        path = folder / "mlp.pt"
        torch.save(MLP(size_mib, width).state_dict(), path)
    elif framework == "onnx":
        import onnx

        from ..models import onnx_mlp

        path = folder / "mlp.onnx"
        onnx.save(onnx_mlp(size_mib, width=width), path)
    else:
        import joblib

        path = folder / "linear.joblib"  # joblib, so that a loader can map it (pickles cannot be)
        joblib.dump(wide_linear_classifier(size_mib, width), path)
    return path


def wide_linear_classifier(size_mib: int, width: int) -> object:
    """A scikit-learn LogisticRegression with ~``size_mib`` MiB of coefficients (set, not fitted)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    classes = max(2, size_mib * MiB // (8 * width))
    rng = np.random.default_rng(0)
    model = LogisticRegression()
    model.coef_ = rng.standard_normal((classes, width)) / width**0.5
    model.intercept_ = np.zeros(classes)
    model.classes_ = np.arange(classes)
    return model


def handler_for(framework: str, config: str, path: str, size_mib: int, width: int, batch_size: int = 0) -> object:
    """Beam's handler for ``framework``, as ``config`` asks: plain, large_model, or wrapped.

    Batches grow adaptively up to 16 elements (Beam's ``BatchElements``), or, with ``batch_size``,
    are exactly that size for every configuration.
    """
    large = config == "beam-large-model"
    batching = {"min_batch_size": batch_size, "max_batch_size": batch_size} if batch_size else {"max_batch_size": 16}
    if framework == "torch":
        from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

        handler = PytorchModelHandlerTensor(state_dict_path=path, model_class=MLP, large_model=large, **batching,
                                            model_params={"size_mib": size_mib, "width": width})
    elif framework == "onnx":
        from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

        handler = OnnxModelHandlerNumpy(model_uri=path, providers=["CPUExecutionProvider"], large_model=large,
                                        **batching)
    else:
        from apache_beam.ml.inference.sklearn_inference import (
            ModelFileType,
            SklearnModelHandlerNumpy,
        )

        handler = SklearnModelHandlerNumpy(model_uri=path, model_file_type=ModelFileType.JOBLIB, large_model=large,
                                           **batching)
    if config.startswith("modelshare"):
        from beam_adapter import SharedModelHandler

        handler = SharedModelHandler(handler, threads=None if config.endswith("framework-threads") else "auto")
    return handler


def examples_for(framework: str, width: int, count: int) -> list:
    """``count`` examples of ``width`` features, as the framework's handler takes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(width).astype(np.float32 if framework != "sklearn" else np.float64)
            for _ in range(count)]
    if framework == "torch":
        import torch

        return [torch.from_numpy(row) for row in rows]
    return rows


class MLP:
    """The model class the PyTorch handler instantiates (the generated MLP)."""

    def __new__(cls, size_mib: int, width: int) -> object:
        from ..models import torch_mlp

        return torch_mlp(size_mib, width=width)


def run_config(framework: str, config: str, path: Path, size_mib: int, width: int, workers: int,
               examples: int, batch_size: int = 0) -> dict:
    """Run one configuration in a fresh process; its wall time and peak total PSS."""
    return run_measured(_PIPELINE, [framework, config, str(path), str(size_mib), str(width), str(workers),
                                    str(examples), str(batch_size)], config)


def run_measured(script: str, argv: list[str], config: str, measured: Optional[int] = None) -> dict:
    """Run ``python -c script *argv`` (it prints a JSON line last); that, with the peak total PSS
    of ``measured`` (default: the script's process) and all its descendants."""
    proc = subprocess.Popen([sys.executable, "-c", script, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    with Peak(lambda: total_pss([measured or proc.pid], descendants=True)) as peak:
        out, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{err[-3000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]), config=config, peak_pss_mib=peak.value / MiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", default="torch", choices=["torch", "sklearn", "onnx"])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="fixed batches of this size for every configuration (default: Beam's adaptive, up to 16)")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(args.framework, args.size_mib, args.width, Path(folder))
        rows = [run_config(args.framework, c, path, args.size_mib, args.width, args.workers, args.examples,
                           args.batch_size) for c in args.configs]
    print(f"{args.framework} model of {args.size_mib} MiB, {args.examples} examples, DirectRunner "
          f"multi_processing with {args.workers} workers, "
          f"{f'batches of {args.batch_size}' if args.batch_size else 'adaptive batches'}\n")
    print("| configuration | wall time | peak total PSS |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['wall_s']:.1f} s | {row['peak_pss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
