"""Codecs: how a model becomes a small skeleton plus large buffers, and back again without a copy.

A codec is what makes a framework's model shareable. ``encode(model)`` splits it into

* a *skeleton*: a few bytes that describe the model's structure (for the generic codec, a
  pickle with every large buffer left out), copied into each process; and
* *buffers*: the weights, as contiguous bytes-like views, written once into a shared segment.

``decode(skeleton, buffers)`` rebuilds the model in another process where ``buffers`` are
read-only memoryviews of the segment: a good codec wraps them (``numpy.frombuffer``,
``torch.frombuffer``, an ONNX ``OrtValue``) instead of copying them. ``estimate(model)`` says how
many bytes the buffers will take, for admission before anything is written.

Codecs are found by the model's type. Framework codecs register by *name* (the dotted path of a
class and the dotted path of the codec), so finding a codec never imports a framework: a class
name in the model's MRO is compared as a string, and the codec module is imported only when a
model of that type actually shows up. Anything without a registered codec goes to the generic
codec (pickle protocol 5, numpy arrays out of band).

Example -- a codec for a hypothetical framework, registered without importing it::

    register_codec("myfw_codec:MyFrameworkCodec", types=["myfw.core.Model"])
"""

from __future__ import annotations

import abc
import importlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

__all__ = ["Codec", "Encoded", "SegmentBuffers", "register_codec", "codec_for", "get_codec"]


@dataclass
class Encoded:
    """A model split by a codec: ``skeleton`` bytes plus the large ``buffers`` to share.

    ``buffer_info`` may give one small JSON-able dict per buffer (a name, dtype, shape); it is
    recorded in the segment's manifest for ``modelshare ls`` and for the codec's own use.
    ``views`` says how attaching processes map the buffers: ``"read-only"`` (a write raises) or
    ``"copy-on-write"`` (for frameworks that cannot hold read-only memory, such as PyTorch: a
    write stays private to the writing process).
    """

    skeleton: bytes
    buffers: list[memoryview]
    buffer_info: list[dict[str, Any]] = field(default_factory=list)
    views: str = "read-only"

    @property
    def nbytes(self) -> int:
        """Bytes of skeleton plus buffers (without the segment's header and alignment)."""
        return len(self.skeleton) + sum(b.nbytes for b in self.buffers)


class SegmentBuffers(list):  # type: ignore[type-arg]
    """What ``Codec.decode`` gets as ``buffers``: memoryviews of the segment, in order.

    ``locations[i]`` says which file holds buffer ``i`` and at what offset -- the segment file, or
    the weights file a file-backed buffer stayed in -- for frameworks that read bytes from a file
    themselves (ONNX Runtime's graph optimizers); empty when the buffers do not come from files.
    ``device``, where set, is the model's GPU copy (``Processes(device="cuda:N")``): a codec builds
    its tensors there, at ``device.address_of(index)`` on ``device.device``, instead of over the
    host views.
    """

    def __init__(self, views: Sequence[memoryview], locations: Sequence[tuple[Path, int]] = (),
                 device: Any = None) -> None:
        super().__init__(views)
        self.locations = list(locations)
        self.device = device


class Codec(abc.ABC):
    """Splits models of some types into skeleton + buffers and rebuilds them over shared views."""

    #: Unique name, stored in every segment so that attaching processes pick the same codec.
    name: str = ""
    def maps_files(self, files: Sequence[Optional[Path]]) -> bool:
        """Whether this codec can decode with buffers left in their weights files (``files[i]``:
        buffer i's file, or None for one copied into the segment); if not, every buffer is copied."""
        return True

    @property
    def layout(self) -> str:
        """What of this instance's options changes the segment it writes (part of the model's
        version, so that two layouts never share a segment); empty for most codecs."""
        return ""

    @abc.abstractmethod
    def encode(self, model: Any) -> Encoded:
        """Split ``model``; buffers must be C-contiguous bytes-like views (no copy needed)."""

    @abc.abstractmethod
    def decode(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> Any:
        """Rebuild the model; ``buffers`` are read-only views of shared memory to wrap, not copy."""

    def estimate(self, model: Any) -> int:
        """Bytes the model will take in a segment. The default encodes it (no buffer is copied)."""
        return self.encode(model).nbytes


CodecRef = Union[Codec, str]

_lock = threading.Lock()
_by_name: dict[str, CodecRef] = {}
_by_type: dict[str, str] = {}


def _type_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(ref: CodecRef) -> Codec:
    if isinstance(ref, Codec):
        return ref
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise ValueError(f"codec path {ref!r} must look like 'package.module:ClassName'")
    codec = getattr(importlib.import_module(module_name), attr)
    return codec() if isinstance(codec, type) else codec


def register_codec(codec: CodecRef, *, types: Iterable[type | str] = (), name: str | None = None) -> None:
    """Register ``codec`` (an instance, or ``'module:Class'`` imported on first use) for ``types``.

    ``types`` are classes or their dotted paths (``'torch.nn.modules.module.Module'``); a model
    whose MRO contains one of them uses this codec. ``name`` is required when ``codec`` is given
    as a path (the codec is not imported to read it).
    """
    codec_name = codec.name if isinstance(codec, Codec) else name
    if not codec_name:
        raise ValueError("register_codec needs the codec's name: pass name=... with a codec path")
    with _lock:
        _by_name[codec_name] = codec
        for t in types:
            _by_type[t if isinstance(t, str) else _type_path(t)] = codec_name


def get_codec(name: str) -> Codec:
    """The codec registered under ``name`` (imported now if it was registered by path)."""
    with _lock:
        ref = _by_name.get(name)
    if ref is None:
        known = ", ".join(sorted(_by_name))
        raise LookupError(
            f"no codec named {name!r} is registered in this process (known: {known}); "
            "import or register the codec's package before attaching models that use it"
        )
    codec = _resolve(ref)
    if not isinstance(ref, Codec):
        with _lock:
            _by_name[name] = codec
    return codec


def codec_for(model: Any) -> Codec:
    """The codec registered for the nearest class in ``type(model).__mro__``, else the generic one."""
    with _lock:
        for cls in type(model).__mro__:
            codec_name = _by_type.get(_type_path(cls))
            if codec_name is not None:
                break
        else:
            codec_name = "generic"
    return get_codec(codec_name)


register_codec("modelshare.codecs.generic:GenericCodec", name="generic")
register_codec("modelshare.codecs.torch:TorchCodec", name="torch", types=["torch.nn.modules.module.Module"])
register_codec("modelshare.codecs.onnx:OnnxCodec", name="onnx",
               types=["onnx.onnx_ml_pb2.ModelProto", "modelshare.codecs._onnx_file.MappedOnnxModel"])
register_codec("modelshare.codecs.tensorrt:TensorRTCodec", name="tensorrt",
               types=["modelshare.codecs.tensorrt.EnginePlan", "tensorrt.tensorrt.ICudaEngine"])
