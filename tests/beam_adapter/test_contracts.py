"""Beam's contracts hold when a handler is wrapped: each case runs the same pipeline with and
without ``SharedModelHandler`` (share="threads" and "processes") and compares what a user sees --
outputs, metrics, raised exceptions, log lines."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install -e '.[beam]')")

from apache_beam.ml.inference.base import (  # noqa: E402
    KeyedModelHandler,
    KeyModelMapping,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_adapter import SharedModelHandler, release_all  # noqa: E402
from modelshare import LoaderError  # noqa: E402

from ..support import eventually, left_after  # noqa: E402
from ..support.workers import Stateful  # noqa: E402

SHARES = ["threads", "processes"]
_runs = itertools.count()


@pytest.fixture(autouse=True)
def _release_after_each(shm_dir: Path) -> Iterable[None]:
    yield
    release_all()


class Outcome:
    """What a pipeline run showed its user: outputs (sorted), metrics by name, the exception."""

    def __init__(self, outputs: list[Any], metrics: dict[str, Any], error: Optional[BaseException]) -> None:
        self.outputs, self.metrics, self.error = outputs, metrics, error


def run_pipeline(build: Callable[[Any], Any], tmp_path: Path, workers: int = 0) -> Outcome:
    """Run the pipeline ``build(p)`` makes (it returns the PCollection of JSON-able outputs)."""
    out = tmp_path / f"out{next(_runs)}"
    options = (PipelineOptions(direct_num_workers=workers, direct_running_mode="multi_processing")
               if workers else PipelineOptions())
    p = beam.Pipeline(options=options)
    build(p) | beam.Map(json.dumps) | beam.io.WriteToText(str(out))
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as error:  # noqa: BLE001 - the contract compares what was raised
        return Outcome([], {}, error)
    outputs = sorted(json.loads(line) for f in tmp_path.glob(out.name + "*") for line in f.read_text().splitlines())
    metrics: dict[str, Any] = {}
    query = result.metrics().query()
    for counter in query["counters"]:
        metrics[counter.key.metric.name] = metrics.get(counter.key.metric.name, 0) + counter.committed
    for dist in query["distributions"]:
        metrics[dist.key.metric.name] = dist.committed
    return Outcome(outputs, metrics, None)



def _beams(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics Beam reports (modelshare's own, ``modelshare_*``, left out)."""
    return {name: value for name, value in metrics.items() if not name.startswith("modelshare_")}


# -- 1. one instance per transform: a stateful model behaves as it does unwrapped ----------------


class StatefulHandler(ModelHandler[float, PredictionResult, Stateful]):
    """A model with state (each call counts): two transforms must not share one instance."""

    def load_model(self) -> Stateful:
        return Stateful(1)

    def run_inference(self, batch: Sequence[float], model: Stateful,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        return [PredictionResult(x, model(x)) for x in batch]

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"max_batch_size": 1}


def _two_transforms(handler: ModelHandler, identifier: Optional[str] = None) -> Callable[[Any], Any]:
    def build(p: Any) -> Any:
        xs = p | beam.Create([0.0, 0.0, 0.0])
        kwargs = {"model_identifier": identifier} if identifier else {}
        a = xs | "A" >> RunInference(handler, **kwargs) | "a" >> beam.Map(lambda r: ["a", r.inference])
        b = xs | "B" >> RunInference(handler, **kwargs) | "b" >> beam.Map(lambda r: ["b", r.inference])
        return (a, b) | beam.Flatten()
    return build


@pytest.mark.parametrize("share", SHARES)
def test_two_transforms_with_one_handler_have_an_instance_each(share: str, tmp_path: Path, shm_dir: Path) -> None:
    beams = run_pipeline(_two_transforms(StatefulHandler()), tmp_path)
    assert beams.outputs == [["a", 1.0], ["a", 2.0], ["a", 3.0], ["b", 1.0], ["b", 2.0], ["b", 3.0]]
    wrapped = run_pipeline(_two_transforms(SharedModelHandler(StatefulHandler(), share)), tmp_path)
    assert wrapped.outputs == beams.outputs
    assert _beams(wrapped.metrics).keys() == beams.metrics.keys()
    assert wrapped.metrics["num_inferences"] == beams.metrics["num_inferences"] == 6
    named = run_pipeline(_two_transforms(SharedModelHandler(StatefulHandler(), share), "one-model"), tmp_path)
    assert named.outputs == run_pipeline(_two_transforms(StatefulHandler(), "one-model"), tmp_path).outputs


# -- 2. a GPU handler where there is no GPU: Beam's fallback and its log line ---------------------


class TorchLinear:
    """The model class a PyTorch handler instantiates (module level: picklable)."""

    def __new__(cls, width: int = 16) -> Any:
        import torch

        torch.manual_seed(0)
        return torch.nn.Linear(width, 1)


BEAMS_GPU_LINE = "Model handler specified a 'GPU' device, but GPUs are not available. Switching to CPU."


@pytest.mark.parametrize("share", SHARES + ["server"])
def test_a_gpu_handler_without_a_gpu_falls_back_as_beams_does(share: str, tmp_path: Path, shm_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the fallback cannot be seen")
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    path = tmp_path / "linear.pt"
    torch.save(TorchLinear().state_dict(), path)

    def handler() -> ModelHandler:
        return PytorchModelHandlerTensor(state_dict_path=str(path), model_class=TorchLinear, device="GPU")

    def build(h: ModelHandler) -> Callable[[Any], Any]:
        return lambda p: (p | beam.Create([torch.ones(16) * i for i in range(4)]) | RunInference(h)
                          | beam.Map(lambda r: round(float(r.inference[0]), 5)))

    with caplog.at_level("WARNING"):
        beams = run_pipeline(build(handler()), tmp_path)
    assert beams.error is None and caplog.text.count(BEAMS_GPU_LINE) >= 1
    caplog.clear()
    with caplog.at_level("INFO"):
        wrapped = run_pipeline(build(SharedModelHandler(handler(), share)), tmp_path)
    assert wrapped.error is None, wrapped.error
    assert wrapped.outputs == beams.outputs
    lines = [r.getMessage() for r in caplog.records]
    assert BEAMS_GPU_LINE in lines
    loading = [i for i, line in enumerate(lines) if line.startswith("Loading state_dict_path")]
    assert all(i > lines.index(BEAMS_GPU_LINE) for i in loading), "the fallback comes before anything loads"
    release_all()
    assert left_after(shm_dir) == []  # a server leaves once its clients are gone


# -- 3. a model that cannot be loaded raises what the wrapped handler raises ------------------------


def _missing_model_handlers(tmp_path: Path) -> dict[str, Callable[[], ModelHandler]]:
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    handlers: dict[str, Callable[[], ModelHandler]] = {
        "sklearn": lambda: SklearnModelHandlerNumpy(model_uri=str(tmp_path / "missing.pkl"))}
    try:
        import torch  # noqa: F401
        from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

        handlers["pytorch"] = lambda: PytorchModelHandlerTensor(state_dict_path=str(tmp_path / "missing.pt"),
                                                                model_class=TorchLinear)
    except ImportError:
        pass
    try:
        import onnxruntime  # noqa: F401
        from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

        handlers["onnx"] = lambda: OnnxModelHandlerNumpy(model_uri=str(tmp_path / "missing.onnx"))
    except ImportError:
        pass
    return handlers


@pytest.mark.parametrize("share", SHARES)
def test_a_model_that_cannot_be_loaded_raises_what_the_handler_raises(share: str, tmp_path: Path,
                                                                     shm_dir: Path) -> None:
    for name, make in _missing_model_handlers(tmp_path).items():
        with pytest.raises(Exception) as beams:
            make().load_model()
        with pytest.raises(Exception) as wrapped:
            SharedModelHandler(make(), share).load_model()
        assert isinstance(wrapped.value, type(beams.value)), (name, type(beams.value), type(wrapped.value))
        assert "missing." in str(wrapped.value), "the error names what could not be loaded"
        assert isinstance(wrapped.value, LoaderError), "modelshare's context is kept"
        def build(handler: ModelHandler) -> Callable[[Any], Any]:
            return lambda p: p | beam.Create([np.zeros(4)]) | RunInference(handler) | beam.Map(lambda r: 0)

        in_beam = run_pipeline(build(make()), tmp_path)
        in_wrapped = run_pipeline(build(SharedModelHandler(make(), share)), tmp_path)
        assert in_beam.error is not None and in_wrapped.error is not None
        assert isinstance(in_wrapped.error, type(in_beam.error)), (name, type(in_beam.error), type(in_wrapped.error))
    assert not list(shm_dir.glob("*.seg")), "a failed load publishes nothing"


# -- 4. a batch that times out drops its instance: the next batch gets a new one ------------------


class HangsOnce(Stateful):
    """Hangs on its first call of ``x < 0`` (long past the transform's timeout)."""

    def __call__(self, x: float) -> float:
        if x < 0:
            time.sleep(4)
        return super().__call__(x)


class HangingHandler(StatefulHandler):
    def load_model(self) -> Stateful:
        return HangsOnce(1)

    def should_garbage_collect_on_timeout(self) -> bool:
        return True  # Beam drops the instance of a timed-out batch (large_model handlers do by default)


@pytest.mark.parametrize("share", SHARES)
def test_a_timed_out_batch_drops_its_instance(share: str, tmp_path: Path, shm_dir: Path) -> None:
    def build(handler: ModelHandler) -> Callable[[Any], Any]:
        def pipeline(p: Any) -> Any:
            good, bad = (p | beam.Create([1.0, -1.0, 1.0, 1.0])
                         | RunInference(handler).with_exception_handling(timeout=2))
            return ((good | "ok" >> beam.Map(lambda r: ["ok", r.example, r.inference]),
                     bad.failed_inferences | "failed" >> beam.Map(lambda e: ["failed"]))
                    | beam.Flatten())
        return pipeline

    beams = run_pipeline(build(HangingHandler()), tmp_path)
    wrapped = run_pipeline(build(SharedModelHandler(HangingHandler(), share)), tmp_path)
    assert beams.error is None and wrapped.error is None, (beams.error, wrapped.error)
    assert ["failed"] in beams.outputs, beams.outputs
    assert wrapped.outputs == beams.outputs, "after a timeout the next batch must get a fresh instance"
    release_all()
    assert eventually(lambda: not list(shm_dir.glob("*.seg"))), "the hung instance is released once it returns"


# -- 5. per-key metrics of a keyed handler over several models ---------------------------------------


def _sklearn_file(path: Path, slope: float) -> str:
    from sklearn.linear_model import LinearRegression

    x = np.arange(8.0).reshape(-1, 1)
    path.write_bytes(pickle.dumps(LinearRegression().fit(x, slope * x.ravel())))
    return str(path)


@pytest.mark.parametrize("budget", [False, True], ids=["no budget", "budget"])
def test_keyed_metrics_per_model_are_reported_unchanged(budget: bool, tmp_path: Path, shm_dir: Path) -> None:
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    from modelshare import Budget

    paths = [_sklearn_file(tmp_path / f"m{i}.pkl", float(i + 1)) for i in range(2)]

    def keyed() -> KeyedModelHandler:
        return KeyedModelHandler([KeyModelMapping(["a"], SklearnModelHandlerNumpy(model_uri=paths[0])),
                                  KeyModelMapping(["b", "c"], SklearnModelHandlerNumpy(model_uri=paths[1]))])

    def build(handler: ModelHandler) -> Callable[[Any], Any]:
        return lambda p: (p | beam.Create([(k, np.array([float(i)])) for i, k in enumerate("abcabc")])
                          | RunInference(handler) | beam.MapTuple(lambda k, r: [k, round(float(r.inference), 6)]))

    beams = run_pipeline(build(keyed()), tmp_path, workers=2)
    wrapped = run_pipeline(build(SharedModelHandler(keyed(), budget=Budget(host="1GiB") if budget else None)),
                           tmp_path, workers=2)  # worker processes: their routers go when they exit
    assert beams.error is None and wrapped.error is None, (beams.error, wrapped.error)
    assert eventually(lambda: not list(shm_dir.glob("*.seg"))), "the last router user evicts what it kept"
    for path in [*shm_dir.glob("*.lock"), *shm_dir.glob("router.*")]:
        path.unlink()
    assert wrapped.outputs == beams.outputs
    assert {"a-_num_inferences", "b-_num_inferences", "a-_load_model_latency_milli_secs"} <= beams.metrics.keys()
    assert _beams(wrapped.metrics).keys() == beams.metrics.keys()
    for name in ("num_inferences", "a-_num_inferences", "b-_num_inferences"):
        assert wrapped.metrics[name] == beams.metrics[name], name
    for name in ("inference_request_batch_size", "a-_inference_request_batch_size"):
        assert (wrapped.metrics[name].count, wrapped.metrics[name].sum) == \
            (beams.metrics[name].count, beams.metrics[name].sum), name
    for name in ("b-_model_byte_size", "a-_load_model_latency_milli_secs"):  # loads: once per model per machine
        assert wrapped.metrics[name].count == beams.metrics[name].count == 1, name  # (Beam's bytes: an RSS delta)


# -- 6. a model the codec cannot encode: Beam's default, with a warning; an error where asked -----


class Recursive:
    """Pickling it recurses without end (as a MagicMock's attribute graph can)."""

    def __init__(self) -> None:
        self.scale = 2.0

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.__reduce_ex__(protocol)


class RecursiveHandler(ModelHandler[float, PredictionResult, Recursive]):
    def load_model(self) -> Recursive:
        return Recursive()

    def run_inference(self, batch: Sequence[float], model: Recursive,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        return [PredictionResult(x, x * model.scale) for x in batch]


def test_a_model_the_codec_cannot_encode_runs_as_in_beam(tmp_path: Path, shm_dir: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    def build(handler: ModelHandler) -> Callable[[Any], Any]:
        return lambda p: p | beam.Create([1.0, 2.0]) | RunInference(handler) | beam.Map(lambda r: r.inference)

    beams = run_pipeline(build(RecursiveHandler()), tmp_path)
    with caplog.at_level("WARNING"):
        wrapped = run_pipeline(build(SharedModelHandler(RecursiveHandler())), tmp_path)
    assert wrapped.error is None and wrapped.outputs == beams.outputs == [2.0, 4.0]
    assert "RecursiveHandler.load_model() returns cannot be split into shared weights" in caplog.text
    assert "excessively deep recursion" in caplog.text, "the warning names why"
    asked = run_pipeline(build(SharedModelHandler(RecursiveHandler(), "processes")), tmp_path)
    assert asked.error is not None and "RecursiveHandler.load_model() returns cannot be split" in str(asked.error)
    assert "share='threads'" in str(asked.error), "the error names the fix"
    assert not isinstance(asked.error, RecursionError)


def test_contracts_hold_in_worker_processes(tmp_path: Path, shm_dir: Path) -> None:
    """The first contract again with the DirectRunner's worker processes (2 of them)."""
    beams = run_pipeline(_two_transforms(StatefulHandler()), tmp_path, workers=2)
    wrapped = run_pipeline(_two_transforms(SharedModelHandler(StatefulHandler())), tmp_path, workers=2)
    assert wrapped.error is None and wrapped.outputs == beams.outputs
    assert sorted(os.listdir(shm_dir)) == [] or not list(shm_dir.glob("*.seg"))


def test_vllm_handlers_run_in_server_mode() -> None:
    """vLLM's model is a server process of its own: never loaded in a worker to be split."""
    pytest.importorskip("openai", reason="Beam's vLLM handlers import openai (not installed)")
    from apache_beam.ml.inference.vllm_inference import VLLMCompletionsModelHandler

    wrapped = SharedModelHandler(VLLMCompletionsModelHandler(model_name="facebook/opt-125m"))
    assert wrapped._share == "server" and wrapped._copies == 1
