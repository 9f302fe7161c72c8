"""A Beam pipeline whose PyTorch model is loaded once per machine, whatever the number of workers.

    python examples/shared_pytorch_pipeline.py [--workers 4] [--size-mib 64]

It writes a generated MLP's state dict to a temporary folder, then runs RunInference over it on
the DirectRunner with ``direct_num_workers`` worker processes. The only change from a plain Beam
pipeline is the ``SharedModelHandler(...)`` around the handler: the first worker loads the model
and every other one attaches to the same weights in shared memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
from apache_beam.options.pipeline_options import PipelineOptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from beam_adapter import SharedModelHandler  # noqa: E402
from benchmarks.models import torch_mlp  # noqa: E402


class MLP(torch.nn.Sequential):
    """The model class the handler instantiates before loading the state dict."""

    def __init__(self, size_mib: int, width: int) -> None:
        super().__init__(*torch_mlp(size_mib, width=width))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--examples", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        state_dict = Path(folder) / "mlp.pt"
        torch.save(MLP(args.size_mib, args.width).state_dict(), state_dict)
        handler = SharedModelHandler(PytorchModelHandlerTensor(
            state_dict_path=str(state_dict), model_class=MLP,
            model_params={"size_mib": args.size_mib, "width": args.width}, max_batch_size=8))
        rng = np.random.default_rng(0)
        examples = [(i, torch.from_numpy(rng.standard_normal(args.width).astype(np.float32)))
                    for i in range(args.examples)]
        options = PipelineOptions(direct_num_workers=args.workers, direct_running_mode="multi_processing")
        with beam.Pipeline(options=options) as pipeline:
            (pipeline
             | beam.Create(examples)
             | RunInference(KeyedModelHandler(handler))
             | beam.MapTuple(lambda i, result: (i, float(result.inference.sum())))
             | beam.combiners.Count.Globally()
             | beam.Map(lambda n: print(f"{n} predictions from {args.workers} workers sharing one "
                                        f"{args.size_mib} MiB model")))


if __name__ == "__main__":
    main()
