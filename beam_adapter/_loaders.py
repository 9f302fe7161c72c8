"""Which loader shares a Beam handler's model: a lean one where the handler's file allows, else the
handler's own ``load_model``.

Beam's PyTorch handler builds ``model_class(**model_params)`` with freshly initialised weights,
``torch.load``s the state dict beside it and copies it in: for a moment the loading process holds
the model two or three times over, and before publishing to shared memory that moment is the peak
of the whole machine. ``modelshare.loaders`` builds the same model from a memory-mapped file
instead. It applies to local state-dict files loaded on the CPU; anything else (TorchScript,
remote paths, a GPU device, a module whose buffers are not all in the state dict) goes through
the handler's own ``load_model``, so the result is always the model Beam would have built.

scikit-learn models saved with joblib (``model_file_type=ModelFileType.JOBLIB``, a local file) are
loaded with ``joblib.load(mmap_mode="r")``. Pickled models cannot be mapped and load Beam's way.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from modelshare.loaders import JoblibMmap, OnCpu, TorchStateDict

__all__ = ["lean_loader", "cpu_loader"]


def _is_local_file(path: Any) -> bool:
    return bool(path) and "://" not in str(path) and os.path.isfile(path)


def lean_loader(handler: Any, on_cpu: bool = False) -> Optional[Callable[[], Any]]:
    """A lean loader for ``handler`` if one applies, else None (use ``handler.load_model``).
    ``on_cpu``: the model is loaded on the CPU even if the handler runs on a GPU (modelshare puts
    it there: ``Processes(device=...)``)."""
    module = type(handler).__module__
    if module == "apache_beam.ml.inference.sklearn_inference":
        from apache_beam.ml.inference.sklearn_inference import ModelFileType

        joblib_file = getattr(handler, "_model_file_type", None) == ModelFileType.JOBLIB
        return JoblibMmap(handler._model_uri) if joblib_file and _is_local_file(handler._model_uri) else None
    if module != "apache_beam.ml.inference.pytorch_inference":
        return None
    if getattr(handler, "_torch_script_model_path", None) or not getattr(handler, "_model_class", None):
        return None
    path, device = getattr(handler, "_state_dict_path", None), str(getattr(handler, "_device", "cpu"))
    if not _is_local_file(path) or (device != "cpu" and not on_cpu):
        return None
    return TorchStateDict(handler._model_class, path, params=handler._model_params,
                          load_args=handler._load_model_args, fallback=handler.load_model)


def cpu_loader(handler: Any) -> Callable[[], Any]:
    """A loader of ``handler``'s model on the CPU, for modelshare to place on a GPU itself."""
    return lean_loader(handler, on_cpu=True) or OnCpu(handler.load_model)
