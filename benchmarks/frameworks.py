"""Each framework the benchmarks run: how to build, save, load privately, share and call a model.

A framework is looked up by name in ``FRAMEWORKS`` (spawned workers get the name, not functions).
"Private" is the framework's own way of loading a saved model -- what each Beam worker does by
default; "shared" is modelshare loading that same file once per machine, with the framework's
lean load where it has one (memory-mapping the file, so the one loading process never holds a
private copy beside the segment it publishes).
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np

from . import models

if TYPE_CHECKING:  # imported where used: a peer's worker process never imports modelshare
    from modelshare import SharedModel


@dataclass(frozen=True)
class Framework:
    """How one framework builds, saves, loads, shares and calls a generated model."""

    name: str
    build: Callable[[int], Any]
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    call: Callable[[Any, Any], Any]
    sample: Callable[[], Any]
    module: str  # what a bare process imports, for the PSS baseline
    lean_load: Optional[Callable[[Path], Any]] = None  # a load that maps the file instead of copying it

    def shared(self, path: Path, key: str, directory: Path, share: str = "processes") -> SharedModel[Any]:
        """modelshare loading the same file, once per machine (or per process, ``share="threads"``, with
        the framework's own load: a memory-mapped model would share the file's pages by itself);
        ``share="mapped"``: once per machine, the weights left in the file (``map_files=True``)."""
        from modelshare import Processes, SharedModel

        load = self.lean_load if share in ("processes", "mapped") and self.lean_load else self.load
        mode = Processes(map_files=True) if share == "mapped" else share
        return SharedModel(functools.partial(load, path), key=key, directory=directory, version=str(path), share=mode)

    def equal(self, a: Any, b: Any) -> bool:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))

    def files(self, path: Path) -> list[Path]:
        """The files ``save`` wrote for ``path``: the model, and what it reads beside it."""
        return [path]


def _pickle_save(model: Any, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(model, f, protocol=5)


def _pickle_load(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def _torch_save(model: Any, path: Path) -> None:
    import torch

    torch.save(model, path)


def _torch_load(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=False)


def _torch_lean_load(path: Path) -> Any:
    import torch

    return torch.load(path, weights_only=False, mmap=True)


def _safetensors_save(model: Any, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(model.state_dict(), path)


def _mlp_on_meta(state: dict[str, Any]) -> Any:
    """``models.torch_mlp``'s architecture with its parameters unset (on the meta device), its
    layer shapes read from the state dict -- what a Hugging Face config gives ``from_pretrained``."""
    import torch

    layers: list[Any] = []
    with torch.device("meta"):
        for i in range(sum(key.endswith(".weight") for key in state)):
            out_features, in_features = state[f"{2 * i}.weight"].shape
            layers += [torch.nn.Linear(in_features, out_features), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _safetensors_load(path: Path, *, mapped: bool = False) -> Any:
    """The weights copied into a model of their own (``load_state_dict`` into allocated parameters);
    ``mapped``: the parameters are the mapped file's tensors (``load_file`` maps it, ``assign=True``
    keeps them)."""
    from safetensors.torch import load_file

    state = load_file(path)
    model = _mlp_on_meta(state) if mapped else _mlp_on_meta(state).to_empty(device="cpu")
    model.load_state_dict(state, assign=mapped)
    return model.eval().requires_grad_(False)


def _joblib_save(model: Any, path: Path) -> None:
    import joblib

    joblib.dump(model, path)


def _joblib_load(path: Path) -> Any:
    import joblib

    return joblib.load(path)


def _joblib_lean_load(path: Path) -> Any:
    import joblib

    return joblib.load(path, mmap_mode="r")


def _torch_call(model: Any, x: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(x).numpy()


def _onnx_data(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def _onnx_save(model: Any, path: Path) -> None:
    """The weights as external data beside the model (what large models ship as, and what ORT maps)."""
    import onnx

    onnx.save(model, path, save_as_external_data=True, location=_onnx_data(path).name, size_threshold=1024)


def _onnx_load(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _onnx_mapped_load(path: Path) -> Any:
    """ORT's own mapping: with prepacking off, a session computes on its external data's mapped pages."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _onnx_call(session: Any, x: Any) -> Any:
    return session.run(None, {"x": x})[0]


@dataclass(frozen=True)
class _OnnxFramework(Framework):
    """ORT sessions. Private sessions prepack (ORT's default); shared ones only with ``prepack``.
    Prepacked and unpacked MatMul kernels sum in different orders, so outputs are compared to
    within 1e-5 rather than bit for bit (the tests compare sessions of equal options exactly)."""

    prepack: Union[bool, str] = False

    def shared(self, path: Path, key: str, directory: Path, share: str = "processes") -> SharedModel[Any]:
        from modelshare import Processes, SharedModel

        mode = Processes(map_files=True) if share == "mapped" else share
        return SharedModel.from_onnx(path, key=key, directory=directory, prepack=self.prepack, share=mode)

    def files(self, path: Path) -> list[Path]:
        return [path, _onnx_data(path)]

    def equal(self, a: Any, b: Any) -> bool:
        return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))


FRAMEWORKS: dict[str, Framework] = {
    "numpy": Framework("numpy", models.numpy_mlp, _pickle_save, _pickle_load, lambda m, x: m(x),
                       models.sample_input, "numpy"),
    "torch": Framework("torch", models.torch_mlp, _torch_save, _torch_load, _torch_call, models.torch_input,
                       "torch", _torch_lean_load),
    "safetensors": Framework("safetensors", models.torch_mlp, _safetensors_save, _safetensors_load, _torch_call,
                             models.torch_input, "safetensors.torch",
                             functools.partial(_safetensors_load, mapped=True)),
    "onnx": _OnnxFramework("onnx", models.onnx_mlp, _onnx_save, _onnx_load, _onnx_call, models.onnx_input,
                           "onnxruntime", _onnx_mapped_load),
    "onnx-prepack": _OnnxFramework("onnx-prepack", models.onnx_mlp, _onnx_save, _onnx_load, _onnx_call,
                                   models.onnx_input, "onnxruntime", prepack=True),
    "onnx-shared-prepack": _OnnxFramework("onnx-shared-prepack", models.onnx_mlp, _onnx_save, _onnx_load, _onnx_call,
                                          models.onnx_input, "onnxruntime", prepack="shared"),
    "sklearn": Framework("sklearn", models.sklearn_knn, _joblib_save, _joblib_load, lambda m, x: m.predict_proba(x),
                         models.sklearn_input, "sklearn.neighbors", _joblib_lean_load),
}
