"""Torch storages as segment buffers: the part of pickling that ``torch.save`` does with
``persistent_id``, pointed at shared memory. Imported only once torch is, so never imports it first.

A tensor pickles as (storage, offset, shape, strides, ...); the storage is what holds the bytes.
Encoding hands each distinct storage's bytes to the segment as one buffer; decoding rebuilds the
storage with ``torch.frombuffer`` over the segment's view, so every tensor built on it -- tied
parameters, views, non-contiguous tensors, any dtype -- points at shared memory.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import EncodeError


def storage_of(obj: Any) -> Optional[tuple[torch.UntypedStorage, str]]:
    """(untyped storage, dtype name) if ``obj`` is a torch storage, else None."""
    if isinstance(obj, torch.storage.TypedStorage):
        return obj._untyped_storage, str(obj.dtype).removeprefix("torch.")
    if isinstance(obj, torch.UntypedStorage):
        return obj, "uint8"
    return None


def storage_key(storage: torch.UntypedStorage) -> tuple[int, int]:
    """Identity of a storage's memory (two storage objects over the same bytes are one)."""
    return (storage.data_ptr(), storage.nbytes())


def storage_bytes(storage: torch.UntypedStorage, owner: Any) -> memoryview:
    """A zero-copy bytes view of a CPU storage; other devices are refused with what to do."""
    if storage.device.type != "cpu":
        raise EncodeError(
            f"{type(owner).__qualname__} holds a tensor on {storage.device}; the loader must return the "
            "model on the CPU (e.g. torch.load(..., map_location='cpu')). For one copy on a GPU that every "
            "process computes on, pass SharedModel(..., device='cuda:N'): modelshare puts it there"
        )
    as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    return memoryview(as_bytes.numpy())


def shared_storage(buffer: memoryview) -> torch.UntypedStorage:
    """An ``UntypedStorage`` over a (writable, copy-on-write) segment buffer: no copy."""
    return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage() if buffer.nbytes else torch.UntypedStorage(0)


def typed(storage: torch.UntypedStorage, dtype: str) -> torch.storage.TypedStorage:
    """What a pickled tensor expects back from ``persistent_load``."""
    return torch.storage.TypedStorage(wrap_storage=storage, dtype=getattr(torch, dtype), _internal=True)


class _DeviceBytes:
    """``nbytes`` of a GPU copy at ``address``, as ``__cuda_array_interface__``; tensors built on it keep
    it -- and through it the copy's mapping -- alive."""

    def __init__(self, address: int, nbytes: int, owner: Any) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "strides": None, "version": 3}
        self.owner = owner


def device_storage(placement: Any, index: int, nbytes: int) -> torch.UntypedStorage:
    """An ``UntypedStorage`` over buffer ``index`` of a GPU copy (``placement``: a ``DeviceCopy``)."""
    if not nbytes:
        return torch.UntypedStorage(0, device=placement.device)
    torch.cuda.init()
    raw = _DeviceBytes(placement.address_of(index), nbytes, placement)
    return torch.as_tensor(raw, device=placement.device).untyped_storage()


def storage_loader(buffers: Sequence[memoryview]) -> Callable[[int, str], torch.storage.TypedStorage]:
    """``load(index, dtype)``: the typed storage over buffer ``index``, each made once -- on the
    buffers' GPU copy where they have one (``SegmentBuffers.device``), else over the host view."""
    made: dict[int, torch.UntypedStorage] = {}
    placement = getattr(buffers, "device", None)

    def load(index: int, dtype: str) -> torch.storage.TypedStorage:
        if index not in made:
            view = buffers[index]
            made[index] = device_storage(placement, index, view.nbytes) if placement else shared_storage(view)
        return typed(made[index], dtype)

    return load
