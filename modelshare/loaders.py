"""Loaders that build a model without a private copy of its weights on the way.

A loader that reads a weights file the usual way -- build the model with fresh weights, read the
file into memory, copy it in -- holds the model two or three times over at its peak, and in the
process that publishes to shared memory that peak is the whole machine's. These loaders map the
file instead (the page cache, not private memory) and hand its pages to the model, which the
segment then copies once -- or, with ``Processes(map_files=...)``, leaves in the file (a
file-backed segment: every process maps the file, the page cache is the one copy):

* :class:`TorchStateDict`: ``model_class(**params)`` built on the meta device (no storage), the
  state dict memory-mapped (``torch.load(mmap=True)``, or ``safetensors`` for a ``.safetensors``
  file: what Hugging Face models ship as) and assigned (``load_state_dict(assign=True)``);
* :class:`JoblibMmap`: ``joblib.load(path, mmap_mode="r")`` (scikit-learn estimators saved with joblib);
* :class:`OnCpu`: any loader's model moved to the CPU, for ``Processes(device="cuda:N")``, which
  puts the weights on the GPU itself.

Each is a small picklable object, and its arguments are its fingerprint (a changed path or class
is a new model version); its ``files`` are watched (a rewritten weights file is a new version too)::

    SharedModel(TorchStateDict(Encoder, "encoder.pt", params={"width": 512}), key="encoder")

No framework is imported until a loader runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

__all__ = ["TorchStateDict", "JoblibMmap", "OnCpu"]


class TorchStateDict:
    """``model_class(**params)`` with the weights of the state dict at ``path``, never copied privately.

    A ``.safetensors`` file is read with ``safetensors`` (install it); any other with ``torch.load``,
    which ``load_args`` go to. If the state dict leaves a parameter or buffer unset (still
    on the meta device), the model is built by ``fallback()`` instead, when given (else a
    ``ValueError`` names what is missing). The model comes back in eval mode, without gradients.
    """

    def __init__(self, model_class: Callable[..., Any], path: Union[str, Path], *,
                 params: Optional[Mapping[str, Any]] = None, load_args: Optional[Mapping[str, Any]] = None,
                 fallback: Optional[Callable[[], Any]] = None) -> None:
        self.model_class = model_class
        self.path = str(path)
        self.params = dict(params or {})
        self.load_args = dict(load_args or {})
        self.fallback = fallback

    def __call__(self) -> Any:
        import torch

        with torch.device("meta"):
            model = self.model_class(**self.params)
        if self.path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(self.path, device="cpu")
        else:
            state = torch.load(self.path, map_location="cpu", mmap=True, **self.load_args)
        model.load_state_dict(state, assign=True)
        missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing:
            if self.fallback is not None:
                return self.fallback()  # something the state dict does not hold: build it the usual way
            raise ValueError(f"the state dict {self.path} does not set {', '.join(missing[:5])} of "
                             f"{getattr(self.model_class, '__name__', self.model_class)}; pass fallback= to build "
                             "such a model the usual way")
        model.requires_grad_(False)
        return model.eval()

    @property
    def files(self) -> tuple[str, ...]:
        """The state dict file, whose identity versions the model."""
        return (self.path,)


class JoblibMmap:
    """``joblib.load(path, mmap_mode="r")``: the estimator's arrays are views of the file's pages."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = str(path)

    def __call__(self) -> Any:
        import joblib

        return joblib.load(self.path, mmap_mode="r")

    @property
    def files(self) -> tuple[str, ...]:
        """The joblib file, whose identity versions the model."""
        return (self.path,)


class OnCpu:
    """``loader()``'s model, moved to the CPU (``model.to("cpu")`` where it has one)."""

    def __init__(self, loader: Callable[[], Any]) -> None:
        self.loader = loader

    def __call__(self) -> Any:
        model = self.loader()
        return model.to("cpu") if hasattr(model, "to") else model

    @property
    def files(self) -> tuple[str, ...]:
        """The files the wrapped loader reads, if it names them."""
        return tuple(getattr(self.loader, "files", None) or ())
