"""A real Beam pipeline, four ways: Beam's default, Beam's ``large_model=True``, and modelshare's
``SharedModelHandler`` with the frameworks' own thread pools or with threads shared out.

Each configuration runs RunInference over a generated PyTorch MLP on the DirectRunner with
``direct_num_workers`` worker processes (``multi_processing``), in a fresh process; this process
samples the total PSS of that process and all its descendants (the SDK workers, Beam's model
server) every 100 ms and reports the peak, with the wall time of the whole pipeline.

Run: ``python -m benchmarks.beam_pipeline [--size-mib 256] [--workers 4] [--examples 2000]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from .models import MiB

CONFIGS = ["beam-default", "beam-large-model", "modelshare-framework-threads", "modelshare-auto-threads"]

_PIPELINE = """
import sys, time, json
import numpy as np, torch
import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
from apache_beam.options.pipeline_options import PipelineOptions
from beam_adapter import SharedModelHandler
from benchmarks.beam_pipeline import MLP
config, state_dict, size_mib, width, workers, examples = sys.argv[1:7]
size_mib, width, workers, examples = int(size_mib), int(width), int(workers), int(examples)
handler = PytorchModelHandlerTensor(state_dict_path=state_dict, model_class=MLP,
                                    model_params={'size_mib': size_mib, 'width': width}, max_batch_size=16,
                                    large_model=config == 'beam-large-model')
if config.startswith('modelshare'):
    handler = SharedModelHandler(handler, threads=None if config.endswith('framework-threads') else 'auto')
rng = np.random.default_rng(0)
data = [torch.from_numpy(rng.standard_normal(width).astype(np.float32)) for _ in range(examples)]
start = time.perf_counter()
with beam.Pipeline(options=PipelineOptions(direct_num_workers=workers,
                                           direct_running_mode='multi_processing')) as p:
    _ = p | beam.Create(data) | RunInference(handler) | beam.Map(lambda r: float(r.inference.sum()))
print(json.dumps({'wall_s': time.perf_counter() - start}))
"""


class MLP:
    """The model class the PyTorch handler instantiates (the generated MLP)."""

    def __new__(cls, size_mib: int, width: int) -> object:
        from .models import torch_mlp

        return torch_mlp(size_mib, width=width)


def _tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_config(config: str, state_dict: Path, size_mib: int, width: int, workers: int, examples: int) -> dict:
    """Run one configuration in a fresh process; its wall time and peak total PSS."""
    proc = subprocess.Popen([sys.executable, "-c", _PIPELINE, config, str(state_dict), str(size_mib), str(width),
                             str(workers), str(examples)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parent.parent)
    peak = 0
    root = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_pss(root))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=1800)
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{err[-3000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]), config=config, peak_pss_mib=peak / MiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as folder:
        state_dict = Path(folder) / "mlp.pt"
        torch.save(MLP(args.size_mib, args.width).state_dict(), state_dict)
        rows = [run_config(c, state_dict, args.size_mib, args.width, args.workers, args.examples)
                for c in args.configs]
    print(f"PyTorch MLP of {args.size_mib} MiB, {args.examples} examples, DirectRunner multi_processing with "
          f"{args.workers} workers\n")
    print("| configuration | wall time | peak total PSS |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['wall_s']:.1f} s | {row['peak_pss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
