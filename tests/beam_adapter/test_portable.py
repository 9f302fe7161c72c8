"""A wrapped pipeline through the path real runners take: PortableRunner, Beam's Python job
service, SDK harnesses in separate processes started by a worker pool (EXTERNAL environment)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install -e '.[beam]')")
torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e '.[torch]')")

from apache_beam.ml.inference.base import RunInference  # noqa: E402
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_adapter import SharedModelHandler  # noqa: E402
from benchmarks.studies.portable_runner import job_service, portable_options, worker_pool  # noqa: E402

from ..support import left_after  # noqa: E402

WIDTH = 256


class Net:
    """The model class the handler instantiates (a 4 MiB MLP)."""

    def __new__(cls) -> Any:
        from benchmarks.models import torch_mlp

        return torch_mlp(4, width=WIDTH)


class CountingHandler(PytorchModelHandlerTensor):
    """Beam's PyTorch handler, counting its loads (each appends its pid to ``counter``)."""

    def __init__(self, counter: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.counter = counter

    def load_model(self) -> Any:
        with open(self.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().load_model()


@pytest.mark.timeout(600)
def test_a_wrapped_pipeline_runs_through_the_portable_runner(tmp_path: Path, shm_dir: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(Net().state_dict(), path)
    counter = tmp_path / "loads"
    handler = CountingHandler(str(counter), state_dict_path=str(path), model_class=Net, max_batch_size=8)
    rows = np.random.default_rng(0).standard_normal((64, WIDTH)).astype(np.float32)
    with torch.no_grad():
        expected = {i: round(float(v), 3) for i, v in enumerate(Net()(torch.from_numpy(rows)).sum(dim=1))}
    out = tmp_path / "out"
    with worker_pool() as (address, pool), job_service(2) as endpoint:
        with beam.Pipeline(options=PipelineOptions(portable_options(endpoint, address))) as p:
            (p
             | beam.Create([(i, torch.from_numpy(r)) for i, r in enumerate(rows)])
             | beam.Reshuffle()
             | RunInference(_keyed(SharedModelHandler(handler)))
             | beam.MapTuple(lambda i, r: json.dumps([i, round(float(r.inference.sum()), 3), os.getppid()]))
             | beam.io.WriteToText(str(out)))
    got = [json.loads(line) for f in tmp_path.glob("out*") for line in f.read_text().splitlines()]
    assert {i: v for i, v, _ in got} == expected
    assert {parent for _, _, parent in got} == {pool.pid}, "inference ran in harnesses the worker pool started"
    loads = counter.read_text().split()
    assert len(loads) == 1, f"the model was loaded {len(loads)} times: once per machine expected"
    assert left_after(shm_dir) == [], "harnesses release what they held when their job ends"


def _keyed(handler: Any) -> Any:
    from apache_beam.ml.inference.base import KeyedModelHandler

    return KeyedModelHandler(handler)
