"""What is shared, handler by handler: each Beam handler wrapped in ``SharedModelHandler``, its
model published by this process, then attached by a fresh spawned process that reports how many
bytes the attach added to its own private memory beside the segment it maps, and what a second
instance (a second transform's) added.

A handler whose codec rebuilds the model over the segment (PyTorch, scikit-learn arrays, ONNX
initializers) adds next to nothing; one whose model pickles its weights as bytes (XGBoost's
booster, a Keras model) adds a private copy per process -- the segment then only saves the load.

Run: ``python -m benchmarks.studies.handler_sharing [--size-mib 64]`` (handlers whose framework is
not installed are left out, with the reason).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..models import MiB


def _torch(folder: Path, mib: int) -> Any:
    import torch
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

    from .beam_pipeline import MLP

    torch.save(MLP(mib, 2048).state_dict(), folder / "mlp.pt")
    return PytorchModelHandlerTensor(state_dict_path=str(folder / "mlp.pt"), model_class=MLP,
                                     model_params={"size_mib": mib, "width": 2048})


def _sklearn(folder: Path, mib: int) -> Any:
    import joblib
    from apache_beam.ml.inference.sklearn_inference import ModelFileType, SklearnModelHandlerNumpy

    from .beam_pipeline import wide_linear_classifier

    joblib.dump(wide_linear_classifier(mib, 2048), folder / "linear.joblib")
    return SklearnModelHandlerNumpy(model_uri=str(folder / "linear.joblib"), model_file_type=ModelFileType.JOBLIB)


def _onnx(folder: Path, mib: int) -> Any:
    import onnx
    from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

    from ..models import onnx_mlp

    onnx.save(onnx_mlp(mib, width=2048), folder / "mlp.onnx")
    return OnnxModelHandlerNumpy(model_uri=str(folder / "mlp.onnx"), providers=["CPUExecutionProvider"])


def _xgboost(folder: Path, mib: int) -> Any:
    import numpy as np
    import xgboost
    from apache_beam.ml.inference.xgboost_inference import XGBoostModelHandlerNumpy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 32))
    model = xgboost.XGBRegressor(n_estimators=max(50, mib * 12), max_depth=8, tree_method="hist")
    model.fit(x, x @ rng.standard_normal(32))
    model.save_model(folder / "xgb.json")
    return XGBoostModelHandlerNumpy(model_class=xgboost.XGBRegressor, model_state=str(folder / "xgb.json"))


def _bert_folder(folder: Path, mib: int) -> Path:
    import transformers

    hidden = 512
    layers = max(1, mib * MiB // (4 * 12 * hidden * hidden))  # ~12 h^2 float32 parameters per layer
    config = transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=8, intermediate_size=4 * hidden)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _huggingface(folder: Path, mib: int) -> Any:
    import transformers
    from apache_beam.ml.inference.huggingface_inference import HuggingFaceModelHandlerKeyedTensor

    return HuggingFaceModelHandlerKeyedTensor(model_uri=str(_bert_folder(folder, mib)),
                                              model_class=transformers.BertModel, framework="pt")


def _huggingface_pipeline(folder: Path, mib: int) -> Any:
    from apache_beam.ml.inference.huggingface_inference import HuggingFacePipelineModelHandler

    path = str(_bert_folder(folder, mib))
    return HuggingFacePipelineModelHandler(task="feature-extraction", model=path,
                                           load_pipeline_args={"tokenizer": path})


def _tensorflow(folder: Path, mib: int) -> Any:
    import tensorflow as tf
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

    width = int((mib * MiB / 4) ** 0.5)
    tf.keras.Sequential([tf.keras.Input((width,)), tf.keras.layers.Dense(width)]).save(folder / "dense.keras")
    return TFModelHandlerNumpy(model_uri=str(folder / "dense.keras"))


HANDLERS: dict[str, Callable[[Path, int], Any]] = {
    "PytorchModelHandlerTensor": _torch, "SklearnModelHandlerNumpy (joblib)": _sklearn,
    "OnnxModelHandlerNumpy": _onnx, "XGBoostModelHandlerNumpy": _xgboost,
    "HuggingFaceModelHandlerKeyedTensor": _huggingface, "HuggingFacePipelineModelHandler": _huggingface_pipeline,
    "TFModelHandlerNumpy": _tensorflow,
}


def _attach(handler: Any, results: Any) -> None:
    """In a fresh process: attach to the published model; the private bytes that added."""
    import gc

    from beam_adapter import SharedModelHandler
    from modelshare import memory

    wrapped = SharedModelHandler(handler)
    gc.collect()
    before = memory.process().private
    model = wrapped.load_model()
    gc.collect()
    added = memory.process().private - before
    another = wrapped.load_model()  # a second transform's instance: no framework start-up in it
    gc.collect()
    again = memory.process().private - before - added
    info = wrapped._shared.hold_info() if wrapped._shared is not None else None
    results.put((wrapped._share, info.loaded_here if info else None, added, again, info.shared_bytes if info else 0))
    del model, another


def measure(name: str, folder: Path, mib: int) -> dict[str, Any]:
    from beam_adapter import SharedModelHandler, release_all

    handler = HANDLERS[name](folder, mib)
    publisher = SharedModelHandler(handler)
    model = publisher.load_model()  # published here; the child attaches
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    child = spawn.Process(target=_attach, args=(handler, results))
    child.start()
    share, loaded_here, added, again, segment = results.get(timeout=600)
    child.join(120)
    del model
    release_all()
    return {"handler": name, "share": share, "attached": loaded_here is False, "segment_mib": segment / MiB,
            "private_mib": added / MiB, "instance_mib": again / MiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--handlers", nargs="+", default=list(HANDLERS), choices=list(HANDLERS))
    args = parser.parse_args()
    os.environ.setdefault("MODELSHARE_DIR", tempfile.mkdtemp(prefix="modelshare-handlers-", dir="/dev/shm"))
    rows = []
    for name in args.handlers:
        with tempfile.TemporaryDirectory() as folder:
            try:
                rows.append(measure(name, Path(folder), args.size_mib))
            except ImportError as exc:
                print(f"{name}: left out ({exc})")
    print(f"\nmodels of ~{args.size_mib} MiB; a spawned process attaches to what this one published\n")
    print("| handler | share | segment | private bytes the attach added (framework start-up included) "
          "| a second instance added |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['handler']} | {row['share']}{'' if row['attached'] else ' (loaded, not attached)'} | "
              f"{row['segment_mib']:.0f} MiB | {row['private_mib']:.1f} MiB | {row['instance_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
