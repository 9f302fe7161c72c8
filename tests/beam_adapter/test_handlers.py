"""Every handler Beam ships that users run, wrapped: the same outputs as unwrapped in a pipeline
with worker processes (the DirectRunner's multi_processing, 2 workers), and the model loaded once
per machine where it can be split into weights (Beam's metrics count the loads).

Models are built here with random weights (Hugging Face ones from configs), nothing downloaded.
A handler whose framework is not installed is skipped with the reason: Hugging Face handlers need
``transformers<5`` *and* TensorFlow (Beam 2.77's module imports both), XGBoost's needs ``xgboost``
and ``datatable`` -- all in ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install -e '.[beam]')")

from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_adapter import SharedModelHandler, release_all  # noqa: E402

_runs = itertools.count()


@pytest.fixture(autouse=True)
def _release_after_each(shm_dir: Path) -> Iterable[None]:
    yield
    release_all()


class Case(NamedTuple):
    handler: Callable[[], ModelHandler]  # a fresh handler (wrapped and unwrapped runs must not share one)
    examples: list[Any]
    result: Callable[[Any], Any]  # a PredictionResult's inference as JSON-able numbers
    splittable: bool = True  # the model splits into weights: one load per machine


def _need(*modules: str) -> None:
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[dev]')")


def _rounded(value: Any) -> list[float]:
    return np.round(np.asarray(value, dtype=np.float64).ravel(), 4).tolist()


# -- the cases ----------------------------------------------------------------------------------


class TorchNet:
    """The model class Beam's PyTorch handlers instantiate (module level: picklable)."""

    def __new__(cls, width: int = 32) -> Any:
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


class KeyedNet:
    def __new__(cls) -> Any:
        import torch

        class Net(torch.nn.Module):  # takes its input by keyword, as keyed tensor handlers call it
            def __init__(self) -> None:
                super().__init__()
                self.net = TorchNet()

            def forward(self, features: Any) -> Any:
                return self.net(features)

        return Net()


def pytorch_tensor(tmp_path: Path) -> Case:
    _need("torch")
    import torch
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    torch.save(TorchNet().state_dict(), tmp_path / "net.pt")
    rows = [torch.randn(32, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    return Case(lambda: PytorchModelHandlerTensor(state_dict_path=str(tmp_path / "net.pt"), model_class=TorchNet),
                rows, _rounded)


def pytorch_keyed_tensor(tmp_path: Path) -> Case:
    _need("torch")
    import torch
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerKeyedTensor

    torch.save(KeyedNet().state_dict(), tmp_path / "keyed.pt")
    rows = [{"features": torch.randn(32, generator=torch.Generator().manual_seed(i))} for i in range(12)]
    return Case(lambda: PytorchModelHandlerKeyedTensor(state_dict_path=str(tmp_path / "keyed.pt"),
                                                       model_class=KeyedNet), rows, _rounded)


def _sklearn_regression() -> Any:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    return Ridge().fit(x, x @ np.arange(8.0))


def sklearn_numpy(tmp_path: Path) -> Case:
    _need("sklearn")
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerNumpy

    (tmp_path / "ridge.pkl").write_bytes(pickle.dumps(_sklearn_regression()))
    rows = list(np.random.default_rng(1).standard_normal((12, 8)))
    return Case(lambda: SklearnModelHandlerNumpy(model_uri=str(tmp_path / "ridge.pkl")), rows, _rounded)


def sklearn_pandas(tmp_path: Path) -> Case:
    _need("sklearn", "pandas")
    import pandas as pd
    from apache_beam.ml.inference.sklearn_inference import SklearnModelHandlerPandas

    (tmp_path / "ridge.pkl").write_bytes(pickle.dumps(_sklearn_regression()))
    rows = [pd.DataFrame([row], columns=[f"f{i}" for i in range(8)])
            for row in np.random.default_rng(1).standard_normal((12, 8))]
    return Case(lambda: SklearnModelHandlerPandas(model_uri=str(tmp_path / "ridge.pkl")), rows, _rounded)


def onnx_numpy(tmp_path: Path) -> Case:
    _need("onnx", "onnxruntime")
    import onnx
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

    from benchmarks.models import onnx_mlp

    onnx.save(onnx_mlp(1, width=128), tmp_path / "mlp.onnx")
    rows = list(np.random.default_rng(1).standard_normal((12, 128)).astype(np.float32))
    return Case(lambda: OnnxModelHandlerNumpy(model_uri=str(tmp_path / "mlp.onnx"),
                                              providers=["CPUExecutionProvider"]),
                rows, lambda v: np.round(np.asarray(v, dtype=np.float64).ravel(), 3).tolist())


def xgboost_numpy(tmp_path: Path) -> Case:
    _need("xgboost", "datatable")
    import xgboost
    from apache_beam.ml.inference.xgboost_inference import XGBoostModelHandlerNumpy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    xgboost.XGBRegressor(n_estimators=20, max_depth=3).fit(x, x[:, 0] * 2).save_model(tmp_path / "xgb.json")
    rows = [rng.standard_normal((1, 8)) for _ in range(12)]
    return Case(lambda: XGBoostModelHandlerNumpy(model_class=xgboost.XGBRegressor,
                                                 model_state=str(tmp_path / "xgb.json")), rows, _rounded)


def _bert(folder: Path) -> Path:
    """A 2-layer BERT with random weights and a tokenizer over a tiny vocabulary, saved locally."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "model", "is", "shared", "once", "per", "machine"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128)
    transformers.set_seed(0)
    transformers.BertModel(config).eval().save_pretrained(folder)
    return folder


def huggingface_tensor(tmp_path: Path) -> Case:
    _need("transformers", "tensorflow", "torch")
    import torch
    import transformers
    from apache_beam.ml.inference.huggingface_inference import HuggingFaceModelHandlerTensor

    folder = _bert(tmp_path)
    rows = [torch.tensor([2, 5 + i % 6, 6, 7, 3]) for i in range(12)]

    def last_state(batch: Any, model: Any, device: Any, inference_args: Any, model_id: Any = None) -> Any:
        from apache_beam.ml.inference.base import PredictionResult

        with torch.no_grad():
            states = model(torch.stack(list(batch))).last_hidden_state
        return [PredictionResult(x, s[0, :4]) for x, s in zip(batch, states)]

    class Handler(HuggingFaceModelHandlerTensor):  # Beam 2.77's get_num_bytes fails on dense tensors
        def get_num_bytes(self, batch: Any) -> int:  # (tensor.values() is for sparse ones), wrapped or not
            return sum(t.element_size() * t.nelement() for t in batch)

    return Case(lambda: Handler(model_uri=str(folder), model_class=transformers.BertModel, framework="pt",
                                inference_fn=last_state), rows, _rounded)


def huggingface_keyed_tensor(tmp_path: Path) -> Case:
    _need("transformers", "tensorflow", "torch")
    import torch
    import transformers
    from apache_beam.ml.inference.huggingface_inference import HuggingFaceModelHandlerKeyedTensor

    folder = _bert(tmp_path)
    rows = [{"input_ids": torch.tensor([2, 5 + i % 6, 6, 7, 3]), "attention_mask": torch.ones(5, dtype=torch.long)}
            for i in range(12)]
    return Case(lambda: HuggingFaceModelHandlerKeyedTensor(model_uri=str(folder), model_class=transformers.BertModel,
                                                           framework="pt"),
                rows, lambda v: _rounded(v["last_hidden_state"][0, :4]))


def huggingface_pipeline(tmp_path: Path) -> Case:
    _need("transformers", "tensorflow", "torch")
    from apache_beam.ml.inference.huggingface_inference import HuggingFacePipelineModelHandler

    folder = _bert(tmp_path)
    words = ["the", "model", "is", "shared", "once", "per", "machine"]
    rows = [f"the model is {words[i % 7]} per machine" for i in range(12)]  # one length: a batch needs no padding
    return Case(lambda: HuggingFacePipelineModelHandler(task="feature-extraction", model=str(folder),
                                                        load_pipeline_args={"tokenizer": str(folder)}),
                rows, lambda v: _rounded(np.asarray(v).reshape(-1, 64)[0, :4]))  # nesting varies with batch size


def tensorflow_numpy(tmp_path: Path) -> Case:
    _need("tensorflow")
    import tensorflow as tf
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(16, activation="relu"),
                                 tf.keras.layers.Dense(2)])
    model.save(tmp_path / "dense.keras")
    rows = list(np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32))
    return Case(lambda: TFModelHandlerNumpy(model_uri=str(tmp_path / "dense.keras")), rows, _rounded)


CASES = {f.__name__: f for f in [pytorch_tensor, pytorch_keyed_tensor, sklearn_numpy, sklearn_pandas, onnx_numpy,
                                  xgboost_numpy, huggingface_tensor, huggingface_keyed_tensor, huggingface_pipeline,
                                  tensorflow_numpy]}


def _run(handler: ModelHandler, case: Case, tmp_path: Path) -> tuple[dict[int, Any], dict[str, int]]:
    out = tmp_path / f"out{next(_runs)}"
    p = beam.Pipeline(options=PipelineOptions(direct_num_workers=2, direct_running_mode="multi_processing"))
    (p
     | beam.Create(list(enumerate(case.examples)))
     | RunInference(KeyedModelHandler(handler))
     | beam.MapTuple(lambda i, r, result=case.result: json.dumps([i, result(r.inference)]))
     | beam.io.WriteToText(str(out)))
    run = p.run()
    run.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in run.metrics().query()["counters"]}
    outputs = dict(json.loads(line) for f in tmp_path.glob(out.name + "*") for line in f.read_text().splitlines())
    return outputs, counters


@pytest.mark.parametrize("name", list(CASES))
def test_a_wrapped_handler_gives_the_same_outputs_with_the_model_once(name: str, tmp_path: Path,
                                                                      shm_dir: Path) -> None:
    case = CASES[name](tmp_path)
    expected, _ = _run(case.handler(), case, tmp_path)
    got, counters = _run(SharedModelHandler(case.handler()), case, tmp_path)
    assert len(got) == len(case.examples) and got == expected
    if case.splittable:
        assert counters.get("modelshare_loads") == 1, counters
    assert not list(shm_dir.glob("*.seg")), "the workers released the model when they exited"
