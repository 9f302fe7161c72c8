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
* :class:`Pretrained`: a Hugging Face ``transformers`` model saved with ``save_pretrained`` (its
  config, then the safetensors files mapped and assigned -- ``from_pretrained`` copies them);
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

__all__ = ["TorchStateDict", "Pretrained", "JoblibMmap", "OnCpu"]


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


class Pretrained:
    """A Hugging Face model from a ``save_pretrained`` directory, its weights the mapped files' pages.

    ``model_class`` is a ``transformers`` class or its name (``"AutoModelForCausalLM"``; default
    ``"AutoModel"``). The model is built from ``config.json`` without initializing weights, then
    each tensor of ``model.safetensors`` (or the shards an index names; ``pytorch_model.bin`` where
    there is no safetensors file) is assigned as a view of the mapped file; tied weights are tied
    again. Nothing is downloaded: ``path`` is a local directory (a Hub cache snapshot included).
    A weight the files do not hold is a ``ValueError`` naming it. Pair with
    ``Processes(map_files=True)`` to keep the weights in the files rather than copied::

        SharedModel(Pretrained("/models/bert"), key="bert", share=Processes(map_files=True))
    """

    def __init__(self, path: Union[str, Path], model_class: Union[str, Callable[..., Any]] = "AutoModel") -> None:
        self.path = str(path)
        self.model_class = model_class

    def __call__(self) -> Any:
        import transformers
        from transformers.modeling_utils import no_init_weights

        files = self.files  # no weights here: say so before transformers looks for a model
        cls = getattr(transformers, self.model_class) if isinstance(self.model_class, str) else self.model_class
        config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
        try:
            with no_init_weights():  # storage is allocated but never written: the file's tensors replace it
                model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"model_class {getattr(cls, '__name__', cls)} cannot be built from {self.path}'s "
                             f"config ({type(config).__name__}): {exc}") from exc
        state = _matching_prefix(model, _state_of(files[1:]))
        missing = set(model.load_state_dict(state, strict=False, assign=True).missing_keys)
        model.tie_weights()
        missing -= set(getattr(model, "_tied_weights_keys", None) or ())
        if missing:
            raise ValueError(f"the weights in {self.path} do not set {', '.join(sorted(missing)[:5])} of "
                             f"{type(model).__name__}; is model_class the class it was saved from?")
        model.requires_grad_(False)
        return model.eval()

    @property
    def files(self) -> tuple[str, ...]:
        """``config.json`` and the weight files, whose identities version the model."""
        import json

        folder = Path(self.path)
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (folder / index).exists():
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
                return (str(folder / "config.json"), *(str(folder / shard) for shard in shards))
            if (folder / single).exists():
                return (str(folder / "config.json"), str(folder / single))
        raise FileNotFoundError(f"{self.path} holds no model.safetensors or pytorch_model.bin (nor a sharded "
                                "index of either): pass the directory save_pretrained wrote")


def _state_of(files: tuple[str, ...]) -> dict[str, Any]:
    """The tensors of ``files`` (safetensors, or torch's zip format), each a view of the mapped file."""
    state: dict[str, Any] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(file, device="cpu"))
        else:
            import torch

            state.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return state


def _matching_prefix(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its keys renamed to ``model``'s where the checkpoint was saved from the model with
    its head (keys under ``<base_model_prefix>.``) and loaded into the base model, or the other way."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix == "." or not state:
        return state
    own = set(model.state_dict())
    if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
        return {k[len(prefix):]: v for k, v in state.items()}
    if any(k.startswith(prefix) for k in own) and not any(k.startswith(prefix) for k in state):
        return {prefix + k if prefix + k in own else k: v for k, v in state.items()}
    return state


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
