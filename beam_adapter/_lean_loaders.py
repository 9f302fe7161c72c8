"""Loaders that build a Beam handler's model without a private copy of its weights on the way.

Beam's PyTorch handler builds ``model_class(**model_params)`` with freshly initialised weights,
``torch.load``s the state dict beside it and copies it in: for a moment the loading process holds
the model two or three times over. Before publishing to shared memory that moment is the peak of
the whole machine. The lean loader builds the module on the meta device (no storage),
memory-maps the state dict (``torch.load(mmap=True)``: page cache, not private memory) and
assigns its tensors (``load_state_dict(assign=True)``): the same weights, no copy.

It applies to local state-dict files on the CPU; anything else (TorchScript, remote paths, a GPU
device, a module whose buffers are not all in the state dict) goes through the handler's own
``load_model``, so the result is always the model Beam would have built.

scikit-learn models saved with joblib (``model_file_type=ModelFileType.JOBLIB``, a local file) are
loaded with ``joblib.load(mmap_mode="r")``: their arrays are views of the file's pages until they
are copied into the segment. Pickled models cannot be mapped and load Beam's way.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

__all__ = ["lean_loader"]


class LeanTorchLoader:
    """``model_class(**model_params)`` on the meta device + ``load_state_dict(assign=True)`` of an
    mmapped state dict; falls back to ``fallback`` when any tensor is left on meta."""

    def __init__(self, handler: Any) -> None:
        self.model_class = handler._model_class
        self.model_params = dict(handler._model_params or {})
        self.path = handler._state_dict_path
        self.load_args = dict(handler._load_model_args or {})
        self.fallback = handler.load_model

    def __call__(self) -> Any:
        import torch

        with torch.device("meta"):
            model = self.model_class(**self.model_params)
        state = torch.load(self.path, map_location="cpu", mmap=True, **self.load_args)
        model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            return self.fallback()  # something the state dict does not hold: build it Beam's way
        model.requires_grad_(False)
        return model.eval()


class LeanJoblibLoader:
    """``joblib.load(path, mmap_mode="r")`` of a scikit-learn handler's local joblib file."""

    def __init__(self, handler: Any) -> None:
        self.path = handler._model_uri

    def __call__(self) -> Any:
        import joblib

        return joblib.load(self.path, mmap_mode="r")


def _is_local_file(path: Any) -> bool:
    return bool(path) and "://" not in str(path) and os.path.isfile(path)


class CpuLoader:
    """The handler's own ``load_model``, its result moved to the CPU: for a model that modelshare puts
    on the GPU itself (``device=``) when no lean loader applies."""

    def __init__(self, load_model: Callable[[], Any]) -> None:
        self.load_model = load_model

    def __call__(self) -> Any:
        model = self.load_model()
        return model.to("cpu") if hasattr(model, "to") else model


def lean_loader(handler: Any, on_cpu: bool = False) -> Optional[Callable[[], Any]]:
    """A lean loader for ``handler`` if one applies, else None (use ``handler.load_model``).
    ``on_cpu``: the model is loaded on the CPU even if the handler runs on a GPU (modelshare puts
    it there: ``device=``)."""
    module = type(handler).__module__
    if module == "apache_beam.ml.inference.sklearn_inference":
        from apache_beam.ml.inference.sklearn_inference import ModelFileType

        joblib_file = getattr(handler, "_model_file_type", None) == ModelFileType.JOBLIB
        return LeanJoblibLoader(handler) if joblib_file and _is_local_file(handler._model_uri) else None
    if module != "apache_beam.ml.inference.pytorch_inference":
        return None
    if getattr(handler, "_torch_script_model_path", None) or not getattr(handler, "_model_class", None):
        return None
    path, device = getattr(handler, "_state_dict_path", None), str(getattr(handler, "_device", "cpu"))
    if not _is_local_file(path) or (device != "cpu" and not on_cpu):
        return None
    return LeanTorchLoader(handler)
