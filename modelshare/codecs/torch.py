"""The PyTorch codec: ``nn.Module`` and TorchScript modules shared with zero copies.

An ``nn.Module`` goes through the generic codec, which already treats torch tensors the way
``torch.save`` does -- the module object is pickled, every tensor *storage* leaves the pickle
through ``persistent_id`` -- except that storages go to the segment and come back as
``torch.frombuffer`` views of it. Working on storages rather than a state dict keeps what
``torch.save`` keeps: tied parameters stay one Parameter, views and non-contiguous tensors keep
their offsets and strides, every dtype is bytes, non-persistent buffers and tensors held in plain
attributes come along. The segment is mapped copy-on-write: PyTorch has no read-only tensors, so
a write into a shared weight (fine-tuning in place) copies the touched pages into the writing
process and never reaches the segment or other processes. Never a segfault.

TorchScript (``torch.jit.ScriptModule``) cannot be pickled. Its parameters and buffers are
swapped for empty tensors while ``torch.jit.save`` writes the archive (code and structure: the
skeleton); after ``torch.jit.load`` each one is pointed at its shared storage with
``tensor.data = view``. Zero-copy as well; tensor constants baked into the code stay private.

Only CPU tensors are shared this way: a CUDA or meta tensor is refused with a clear error.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Sequence

import torch

from ..errors import EncodeError
from . import Encoded
from ._torch_storage import storage_bytes, storage_key, storage_loader
from .generic import GenericCodec

__all__ = ["TorchCodec"]

_SCRIPT_MARK = b"modelshare-torchscript-1\n"


def _script_tensors(module: torch.jit.ScriptModule) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


class TorchCodec(GenericCodec):
    """``nn.Module`` (through the generic codec) and TorchScript modules, over shared storages."""

    name = "torch"

    def encode(self, model: Any) -> Encoded:
        if isinstance(model, torch.jit.ScriptModule):
            return self._encode_script(model)
        return super().encode(model)

    def decode(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> Any:
        if bytes(skeleton[: len(_SCRIPT_MARK)]) == _SCRIPT_MARK:
            return self._decode_script(skeleton[len(_SCRIPT_MARK):], buffers)
        return super().decode(skeleton, buffers)

    def _encode_script(self, module: torch.jit.ScriptModule) -> Encoded:
        encoded = Encoded(b"", [], [], views="copy-on-write")
        index: dict[tuple[int, int], int] = {}
        tensors = _script_tensors(module)
        specs = []
        for name, tensor in tensors:
            storage = tensor.untyped_storage()
            key = storage_key(storage)
            if key not in index:
                index[key] = len(encoded.buffers)
                encoded.buffers.append(storage_bytes(storage, module))
                encoded.buffer_info.append({"torchscript": name})
            specs.append((name, index[key], str(tensor.dtype).removeprefix("torch."), tensor.storage_offset(),
                          tuple(tensor.shape), tuple(tensor.stride())))
        originals = [tensor.data for _, tensor in tensors]
        archive = io.BytesIO()
        try:
            for _, tensor in tensors:  # the archive keeps code and structure, not weights
                tensor.data = torch.empty(0, dtype=tensor.dtype)
            torch.jit.save(module, archive)
        except Exception as exc:
            raise EncodeError(f"torch.jit.save failed for {type(module).__qualname__}: {exc}") from exc
        finally:
            for (_, tensor), data in zip(tensors, originals):
                tensor.data = data
        encoded.skeleton = _SCRIPT_MARK + pickle.dumps((archive.getvalue(), specs), protocol=5)
        return encoded

    def _decode_script(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> Any:
        archive, specs = pickle.loads(skeleton)
        module = torch.jit.load(io.BytesIO(archive), map_location="cpu")
        tensors = dict(_script_tensors(module))
        load = storage_loader(buffers)
        for name, index, dtype, offset, shape, stride in specs:
            view = torch.empty(0, dtype=getattr(torch, dtype))
            view.set_(load(index, dtype), offset, shape, stride)
            tensors[name].data = view
        return module
