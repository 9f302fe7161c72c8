"""SharedModelHandler in real Beam pipelines (DirectRunner, in-process and multi-processing)."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install -e '.[beam]')")

from apache_beam.ml.inference.base import (  # noqa: E402
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_adapter import SharedModelHandler, release_all  # noqa: E402
from modelshare import ModelShareError, list_segments  # noqa: E402
from modelshare.memory import Peak  # noqa: E402

from ..support import ROOT, eventually, left_after, leftovers  # noqa: E402


@pytest.fixture(autouse=True)
def _release_after_each(shm_dir: Path) -> Iterable[None]:
    yield
    release_all()  # the in-process runner keeps models as a worker would, until told


_runs = itertools.count()



def run(handler: ModelHandler, examples: list[Any], tmp_path: Path, *, workers: int = 0) -> dict[int, list[float]]:
    """Run ``examples`` through RunInference(KeyedModelHandler(handler)); {index: prediction as floats}."""
    out = tmp_path / f"out{next(_runs)}"
    options = (PipelineOptions(direct_num_workers=workers, direct_running_mode="multi_processing")
               if workers else PipelineOptions())
    with beam.Pipeline(options=options) as p:
        (p
         | beam.Create(list(enumerate(examples)))
         | RunInference(KeyedModelHandler(handler))
         | beam.MapTuple(lambda i, r: json.dumps([i, np.asarray(r.inference, dtype=float).ravel().tolist()]))
         | beam.io.WriteToText(str(out)))
    return dict(json.loads(line) for f in tmp_path.glob(out.name + "*") for line in f.read_text().splitlines())


def _sklearn_model() -> Any:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 64))
    return LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))


def _sklearn_handler(tmp_path: Path) -> ModelHandler:
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_sklearn_model()))
    return SklearnModelHandlerNumpy(model_uri=str(path), max_batch_size=4, min_batch_size=4)


def _examples(n: int = 12, width: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal(width) for _ in range(n)]


def test_sklearn_predictions_same_as_unwrapped(tmp_path: Path, shm_dir: Path) -> None:
    handler = _sklearn_handler(tmp_path)
    examples = _examples()
    expected = run(handler, examples, tmp_path)
    got = run(SharedModelHandler(handler), examples, tmp_path)
    assert got == expected and len(got) == len(examples)
    assert [s.key for s in list_segments(shm_dir)] == ["beam-SklearnModelHandlerNumpy"]


def test_torch_handler(tmp_path: Path, shm_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    from benchmarks.models import torch_mlp

    net = torch_mlp(4, width=128)
    path = tmp_path / "state.pt"
    torch.save(net.state_dict(), path)
    handler = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=_TorchMLP, model_params={"width": 128},
                                        max_batch_size=4, min_batch_size=4)
    examples = [torch.from_numpy(e.astype(np.float32)) for e in _examples(width=128)]
    expected = run(handler, examples, tmp_path)
    got = run(SharedModelHandler(handler), examples, tmp_path)
    assert got == expected
    assert [s.codec for s in list_segments(shm_dir)] == ["torch"]


class _TorchMLP:  # the model class PytorchModelHandlerTensor instantiates (module level: picklable)
    def __new__(cls, width: int) -> Any:
        from benchmarks.models import torch_mlp

        return torch_mlp(4, width=width)


def test_onnx_handler(tmp_path: Path, shm_dir: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

    from benchmarks.models import onnx_mlp

    path = tmp_path / "mlp.onnx"
    onnx.save(onnx_mlp(4, width=128), path)
    handler = OnnxModelHandlerNumpy(model_uri=str(path), providers=["CPUExecutionProvider"],
                                    max_batch_size=4, min_batch_size=4)
    examples = [e.astype(np.float32) for e in _examples(width=128)]
    got = run(SharedModelHandler(handler), examples, tmp_path)
    assert [s.codec for s in list_segments(shm_dir)] == ["onnx"]  # Beam keeps the last model it loaded alive
    expected = run(handler, examples, tmp_path)
    assert set(got) == set(expected)
    for i in got:  # unwrapped sessions prepack their weights: a different MatMul kernel
        np.testing.assert_allclose(got[i], expected[i], rtol=1e-5, atol=1e-6)


def test_multi_processing_workers_share_one_segment(tmp_path: Path, shm_dir: Path) -> None:
    handler = _sklearn_handler(tmp_path)
    examples = _examples(24)
    expected = run(handler, examples, tmp_path)
    got = run(SharedModelHandler(handler), examples, tmp_path, workers=2)
    assert got == expected
    assert leftovers(shm_dir) == [], "worker processes release at exit: nothing is left behind"


class _Scaler:
    """A model holding a lock: not picklable, so not splittable into weights."""

    def __init__(self) -> None:
        self.lock, self.scale = threading.Lock(), 2.0


class _LockModelHandler(ModelHandler[Any, PredictionResult, Any]):
    """A custom handler whose model cannot be pickled."""

    def load_model(self) -> Any:
        return _Scaler()

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        return [PredictionResult(x, x * model.scale) for x in batch]


class _LargeLockModelHandler(_LockModelHandler):
    """The same, asking for Beam's own sharing: ``large_model=True`` or ``model_copies=N``."""

    def __init__(self, copies: int = 1) -> None:
        super().__init__()
        self.copies = copies

    def share_model_across_processes(self) -> bool:
        return True

    def model_copies(self) -> int:
        return self.copies


def test_server_share_runs_an_unsplittable_model_in_a_multi_processing_pipeline(tmp_path: Path,
                                                                                shm_dir: Path) -> None:
    examples = [float(i) for i in range(12)]
    expected = run(_LockModelHandler(), examples, tmp_path, workers=4)
    assert run(SharedModelHandler(_LockModelHandler(), share="server"), examples, tmp_path, workers=4) == expected
    assert left_after(shm_dir) == [], "the server exits once the workers are gone, and removes its files"


def test_beams_own_sharing_keeps_its_meaning(tmp_path: Path, shm_dir: Path) -> None:
    from modelshare._owners.client import ServerClient

    one = SharedModelHandler(_LargeLockModelHandler())  # large_model=True: one copy; unsplittable -> a server
    model = one.load_model()
    assert isinstance(model, ServerClient) and len(model.servers()) == 1
    assert [r.inference for r in one.run_inference([1.0, 3.0], model)] == [2.0, 6.0]
    release_all()
    two = SharedModelHandler(_LargeLockModelHandler(copies=2))  # model_copies=2: exactly two instances
    assert two._share == "server" and two._copies == 2
    assert SharedModelHandler(_sklearn_handler(tmp_path))._share == "processes"
    with pytest.raises(ValueError, match="copies=N is for share='server'"):
        SharedModelHandler(_LockModelHandler(), share="threads", copies=2)
    assert left_after(shm_dir) == []


def test_unsplittable_model_falls_back_to_one_per_process_or_says_which_share_works(
        tmp_path: Path, shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ModelShareError,
                       match=r"_LockModelHandler.load_model\(\) returns cannot be split.*share='server'"):
        SharedModelHandler(_LockModelHandler(), share="processes").load_model()  # asked for: an error
    with caplog.at_level("WARNING"):  # not asked for: Beam's default, one per process, and why
        got = run(SharedModelHandler(_LockModelHandler()), [1.0, 2.0, 3.0], tmp_path)
    assert got == {0: [2.0], 1: [4.0], 2: [6.0]}
    assert "_LockModelHandler.load_model() returns cannot be split into shared weights" in caplog.text
    assert "every worker process loads its own" in caplog.text
    caplog.clear()
    got = run(SharedModelHandler(_LockModelHandler(), share="threads"), [1.0, 2.0, 3.0], tmp_path)
    assert got == {0: [2.0], 1: [4.0], 2: [6.0]} and "cannot be split" not in caplog.text


def test_everything_but_loading_is_the_wrapped_handlers(tmp_path: Path) -> None:
    handler = _sklearn_handler(tmp_path).with_preprocess_fn(lambda x: x * 2).with_postprocess_fn(lambda r: r)
    wrapped = SharedModelHandler(handler)
    assert wrapped.batch_elements_kwargs() == handler.batch_elements_kwargs() == {"min_batch_size": 4,
                                                                                 "max_batch_size": 4}
    assert wrapped.get_metrics_namespace() == handler.get_metrics_namespace()
    assert len(list(wrapped.get_preprocess_fns())) == 1 and len(list(wrapped.get_postprocess_fns())) == 1
    assert wrapped.share_model_across_processes() is False and wrapped.model_copies() == 1
    assert SharedModelHandler(_sklearn_handler(tmp_path).with_no_batching()).should_skip_batching()
    with pytest.raises(TypeError, match="wraps a Beam ModelHandler"):
        SharedModelHandler(object())  # type: ignore[arg-type]


def test_model_update_loads_the_new_version_and_frees_the_old(tmp_path: Path, shm_dir: Path) -> None:

    from sklearn.linear_model import LogisticRegression

    handler = SharedModelHandler(_sklearn_handler(tmp_path), keep_previous=1.0)
    first = handler.load_model()
    again = handler.load_model()  # what a second transform gets: an instance of its own, the same weights
    assert again is not first and np.array_equal(again.coef_, first.coef_)
    (old,) = list_segments(shm_dir)
    old_inode = old.path.stat().st_ino
    x = np.random.default_rng(2).standard_normal((50, 64))
    newer = LogisticRegression(C=0.01).fit(x, (x[:, 1] > 0).astype(int))
    new_path = tmp_path / "model-v2.pkl"
    new_path.write_bytes(pickle.dumps(newer))
    old_path = handler._handler._model_uri
    handler.update_model_path(str(new_path))  # what RunInference does on a model_metadata_pcoll update
    second = handler.load_model()
    np.testing.assert_array_equal(second.coef_, newer.coef_)
    del first, again  # Beam drops the old instances once the new one is in place
    assert old.path.exists(), "kept: a window that still sees the old version must not reload it"
    handler.update_model_path(old_path)  # such a window
    back = handler.load_model()
    np.testing.assert_array_equal(back.coef_, handler._handler.load_model().coef_)
    assert old.path.stat().st_ino == old_inode, "attached to the kept segment, not loaded again"
    handler.update_model_path(str(new_path))
    second = handler.load_model()
    del back
    time.sleep(1.0)  # keep_previous has passed: the next batch lets the old version go
    handler.run_inference(x[:2], second)
    assert eventually(lambda: not old.path.exists()), "the old version's segment is gone"
    (new,) = list_segments(shm_dir)
    assert new.path != old.path


def test_keep_previous_zero_frees_the_old_version_at_once(tmp_path: Path, shm_dir: Path) -> None:
    handler = SharedModelHandler(_sklearn_handler(tmp_path), keep_previous=0)
    first = handler.load_model()
    (old,) = list_segments(shm_dir)
    new_path = tmp_path / "model-v2.pkl"
    new_path.write_bytes(Path(handler._handler._model_uri).read_bytes())
    handler.update_model_path(str(new_path))
    second = handler.load_model()
    del first
    assert eventually(lambda: not old.path.exists()), "nothing kept: the old segment goes with its instances"
    with pytest.raises(ValueError, match="keep_previous is seconds"):
        SharedModelHandler(_sklearn_handler(tmp_path), keep_previous=-1)
    del second


def test_example_pipeline_runs(shm_dir: Path) -> None:
    import os
    import subprocess
    import sys

    example = ROOT / "examples" / "shared_pytorch_pipeline.py"
    out = subprocess.run([sys.executable, str(example), "--workers", "2", "--size-mib", "16", "--width", "512"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "64 predictions from 2 workers sharing one 16 MiB model" in out.stdout
    assert leftovers(shm_dir) == []


def _linear_model_file(path: Path, slope: float) -> str:
    from sklearn.linear_model import LinearRegression

    x = np.arange(10.0).reshape(-1, 1)
    path.write_bytes(pickle.dumps(LinearRegression().fit(x, slope * x.ravel())))
    return str(path)


def _windowed_update_pipeline(handler: Any, versions: list[str], options: Any = None, interval: int = 7) -> Any:
    """Main input in fixed windows, one element each second; a ``ModelMetadata`` side input in the
    same windows naming version i in window i (version i multiplies by i); the pipeline's result."""
    from apache_beam.ml.inference.base import ModelMetadata
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms import trigger, window
    from apache_beam.transforms.window import TimestampedValue

    start = (math.floor(time.time()) - 60) // interval * interval  # windows start at multiples of interval
    seconds = range(interval * len(versions))  # (a window before the first update gets whichever version is current)
    updates = [(start + i * interval, ModelMetadata(model_id=path, model_name=f"v{i + 1}"))
               for i, path in enumerate(versions)]
    p = beam.Pipeline("FnApiRunner", options=options)  # the runner Beam's own side-input tests pin
    side = (p | "Updates" >> beam.Create(updates) | "StampU" >> beam.Map(lambda x: TimestampedValue(x[1], x[0]))
            | "WindowU" >> beam.WindowInto(window.FixedWindows(interval),
                                           accumulation_mode=trigger.AccumulationMode.DISCARDING)
            | "KeyU" >> beam.Map(lambda x: ("k", x)) | "GroupU" >> beam.GroupByKey()
            | "FlatU" >> beam.FlatMap(lambda kv: kv[1]))
    predictions = (p | "Main" >> beam.Create([start + s for s in seconds])
                   | "StampM" >> beam.Map(lambda x: TimestampedValue(x, x))
                   | "WindowM" >> beam.WindowInto(window.FixedWindows(interval))
                   | "KeyM" >> beam.Map(lambda x: ("k", x)) | "GroupM" >> beam.GroupByKey()
                   | "FlatM" >> beam.FlatMap(lambda kv: kv[1])
                   | "Array" >> beam.Map(lambda x: np.array([float(x - start)]))
                   | RunInference(handler, model_metadata_pcoll=side)
                   | beam.Map(lambda r: (float(r.example[0]), round(float(r.inference), 6))))
    assert_that(predictions, equal_to([(float(s), float(s * (s // interval + 1))) for s in seconds]))  # v_i: i * x
    outcome = p.run()
    outcome.wait_until_finish()
    return outcome


def test_model_update_mid_stream_keeps_then_frees_the_old_segment(tmp_path: Path, shm_dir: Path) -> None:

    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    v1 = _linear_model_file(tmp_path / "v1.pkl", 1.0)
    v2 = _linear_model_file(tmp_path / "v2.pkl", 2.0)
    handler = SharedModelHandler(SklearnModelHandlerNumpy(model_uri=v1))
    _windowed_update_pipeline(handler, [v1, v2])
    versions = sorted(segment.version.rsplit(":", 1)[1] for segment in list_segments(shm_dir))
    assert versions == sorted([v1, v2]), "v2 in use, v1 kept for windows that may still see it"
    release_all()
    assert eventually(lambda: list_segments(shm_dir) == [])


def test_model_updates_load_each_version_once_per_machine(tmp_path: Path, shm_dir: Path) -> None:
    """Three versions through a windowed side input on two worker processes: windows run out of
    order, and a worker meets a version it (or the other) just left -- attached, not reloaded
    (keep_previous=0: 6 loads, as the issue found)."""

    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy
    from apache_beam.options.pipeline_options import PipelineOptions

    versions = [_linear_model_file(tmp_path / f"v{i}.pkl", float(i)) for i in (1, 2, 3)]
    inner = SklearnModelHandlerNumpy(model_uri=versions[0])
    options = PipelineOptions(direct_num_workers=2, direct_running_mode="multi_processing")
    outcome = _windowed_update_pipeline(SharedModelHandler(inner), versions, options)
    metrics = outcome.metrics().query(MetricsFilter().with_namespace(inner.get_metrics_namespace()))
    counters = {m.key.metric.name: m.committed for m in metrics["counters"]}
    assert counters.get("modelshare_loads") == len(versions), counters
    assert eventually(lambda: list_segments(shm_dir) == []), "the workers exited: every version unlinked"


def test_lean_torch_loader_builds_the_same_model_without_a_copy(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    from beam_adapter._loaders import lean_loader
    from modelshare.loaders import TorchStateDict

    path = tmp_path / "state.pt"
    torch.save(_TorchMLP(width=128).state_dict(), path)
    handler = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=_TorchMLP, model_params={"width": 128})
    loader = lean_loader(handler)
    assert isinstance(loader, TorchStateDict)
    lean, beams = loader(), handler.load_model()
    x = torch.randn(3, 128)
    with torch.inference_mode():
        assert torch.equal(lean(x), beams(x))
    scratch = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=_MLPWithScratch,
                                        model_params={"width": 128})
    model = lean_loader(scratch)()  # a non-persistent buffer is not in the state dict: built Beam's way
    assert not any(t.is_meta for t in model.buffers()) and model.scratch.sum() == 128
    assert lean_loader(PytorchModelHandlerTensor(state_dict_path="gs://bucket/x.pt", model_class=_TorchMLP)) is None


def test_lean_joblib_loader_maps_the_file_and_predicts_the_same(tmp_path: Path, shm_dir: Path) -> None:
    import joblib
    from apache_beam.ml.inference.sklearn_inference import ModelFileType, SklearnModelHandlerNumpy

    from beam_adapter._loaders import lean_loader
    from modelshare.loaders import JoblibMmap

    path = tmp_path / "model.joblib"
    joblib.dump(_sklearn_model(), path)
    handler = SklearnModelHandlerNumpy(model_uri=str(path), model_file_type=ModelFileType.JOBLIB,
                                       max_batch_size=4, min_batch_size=4)
    loader = lean_loader(handler)
    assert isinstance(loader, JoblibMmap) and isinstance(loader().coef_, np.memmap)
    assert lean_loader(_sklearn_handler(tmp_path)) is None  # a pickle cannot be mapped: Beam's own load
    examples = _examples()
    got = run(SharedModelHandler(handler), examples, tmp_path)
    assert [s.key for s in list_segments(shm_dir)] == ["beam-SklearnModelHandlerNumpy"]
    assert got == run(handler, examples, tmp_path)


class _MLPWithScratch:
    def __new__(cls, width: int) -> Any:
        import torch

        model = _TorchMLP(width=width)
        model.register_buffer("scratch", torch.ones(width), persistent=False)
        return model


def test_onnx_multi_processing_workers(tmp_path: Path, shm_dir: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

    from benchmarks.models import onnx_mlp

    path = tmp_path / "mlp.onnx"
    onnx.save(onnx_mlp(4, width=128), path)
    examples = [e.astype(np.float32) for e in _examples(16, width=128)]
    handler = OnnxModelHandlerNumpy(model_uri=str(path), providers=["CPUExecutionProvider"],
                                    max_batch_size=4, min_batch_size=4)
    expected = run(handler, examples, tmp_path)
    got = run(SharedModelHandler(handler), examples, tmp_path, workers=2)
    assert set(got) == set(expected)
    for i in got:
        np.testing.assert_allclose(got[i], expected[i], rtol=1e-5, atol=1e-6)
    assert leftovers(shm_dir) == []


def test_two_handlers_of_one_class_keep_their_own_models(tmp_path: Path, shm_dir: Path) -> None:
    first = SharedModelHandler(_sklearn_handler_at(_linear_model_file(tmp_path / "a.pkl", 1.0)))
    second = SharedModelHandler(_sklearn_handler_at(_linear_model_file(tmp_path / "b.pkl", 3.0)))
    a, b = first.load_model(), second.load_model()
    assert first.load_model() is not a and np.array_equal(second.load_model().coef_, b.coef_)
    assert a.coef_[0] == pytest.approx(1.0) and b.coef_[0] == pytest.approx(3.0)
    assert len(list_segments(shm_dir)) == 2


def _sklearn_handler_at(path: str) -> ModelHandler:
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    return SklearnModelHandlerNumpy(model_uri=path)


def test_keyed_models_route_under_a_byte_budget(tmp_path: Path, shm_dir: Path) -> None:
    import joblib
    from apache_beam.ml.inference.base import KeyModelMapping
    from apache_beam.ml.inference.sklearn_inference import ModelFileType, SklearnModelHandlerNumpy
    from sklearn.linear_model import LogisticRegression

    from modelshare import Budget, memory

    rng = np.random.default_rng(0)
    mappings = []
    for i in range(6):  # six models of ~1 MiB each: coefficients of 32 classes x 4096 features
        model = LogisticRegression()
        model.coef_, model.intercept_, model.classes_ = rng.standard_normal((32, 4096)), np.zeros(32), np.arange(32)
        path = tmp_path / f"m{i}.joblib"  # mapped by the lean loader: a load costs the segment alone
        joblib.dump(model, path)
        mappings.append(KeyModelMapping([f"k{i}"], SklearnModelHandlerNumpy(model_uri=str(path),
                                                                             model_file_type=ModelFileType.JOBLIB)))
    keyed = KeyedModelHandler(mappings)
    examples = [(f"k{i % 6}", rng.standard_normal(4096)) for i in range(48)]
    budget = Budget(host=int(2.5 * (32 * 4096 * 8)))  # room for two models at a time

    def run_keyed(handler: ModelHandler) -> list[tuple]:
        out = tmp_path / f"keyed{next(_runs)}"
        with beam.Pipeline(options=PipelineOptions(direct_num_workers=4,
                                                   direct_running_mode="multi_processing")) as p:
            (p
             | beam.Create(examples)
             | RunInference(handler)
             | beam.MapTuple(lambda k, r: json.dumps([k, float(r.example[0]), float(np.asarray(r.inference))]))
             | beam.io.WriteToText(str(out)))
        files = tmp_path.glob(out.name + "*")
        return sorted(tuple(json.loads(line)) for f in files for line in f.read_text().splitlines())

    with Peak(lambda: memory.segment_bytes(shm_dir), every=0.005) as held:
        got = run_keyed(SharedModelHandler(keyed, budget=budget))
    assert got == run_keyed(keyed) and len(got) == 48
    assert held.value <= budget.host, f"held {held.value} bytes under a {budget.host}-byte budget"
    with pytest.raises(ValueError, match="budget= routes the models of a KeyedModelHandler"):
        SharedModelHandler(_sklearn_handler(tmp_path), budget=budget)
    from modelshare._router.membership import sweep_router

    deadline = time.monotonic() + 30  # the workers exited: the last router user evicted the warm models
    while list(shm_dir.glob("*.seg")) and time.monotonic() < deadline:
        time.sleep(0.1)
    sweep_router(shm_dir)  # this process used no router: nothing holds them
    assert not list(shm_dir.glob("*.seg"))
    for name in ("*.lock", "router.*"):
        for path in shm_dir.glob(name):
            path.unlink()


def test_device_placement_follows_the_pytorch_handler_and_is_checked(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    from modelshare import DeviceUnavailableError

    path = tmp_path / "mlp.pt"
    torch.save(_TorchMLP(128).state_dict(), path)
    on_cpu = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=_TorchMLP, model_params={"width": 128})
    with pytest.raises(ValueError, match="runs on cpu.*device='GPU'"):
        SharedModelHandler(on_cpu, device="cuda:0")
    model_path = tmp_path / "model.pkl"
    model_path.write_bytes(pickle.dumps(_sklearn_model()))
    sklearn_handler = SklearnModelHandlerNumpy(model_uri=str(model_path))
    with pytest.raises(ValueError, match="share='processes'"):
        SharedModelHandler(sklearn_handler, share="server", device="cuda:0")
    asked_gpu = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=_TorchMLP,
                                          model_params={"width": 128}, device="GPU")
    wrapped_gpu = SharedModelHandler(asked_gpu)
    assert wrapped_gpu._device == "cuda:0"
    if torch.cuda.is_available():
        return
    model = wrapped_gpu.load_model()  # no GPU: like Beam's handler, the model and batches stay on the CPU
    assert wrapped_gpu._device is None and asked_gpu._device == torch.device("cpu")
    assert next(model.parameters()).device.type == "cpu"
    from apache_beam.ml.inference.base import KeyedModelHandler, KeyModelMapping

    from beam_adapter._keyed import keyed_router
    from modelshare import Budget

    keyed_gpu = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=_TorchMLP,
                                          model_params={"width": 128}, device="GPU")
    router = keyed_router(KeyedModelHandler([KeyModelMapping(["a"], keyed_gpu)]), Budget(host="1GiB"), None)
    assert [router.model(k).mode.device for k in ("a",)] == [None] and keyed_gpu._device == torch.device("cpu")
    wrapped = SharedModelHandler(sklearn_handler, device="cuda:0")
    with pytest.raises(DeviceUnavailableError, match="needs an NVIDIA GPU"):
        wrapped.load_model()
