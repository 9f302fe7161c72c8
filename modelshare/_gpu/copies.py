"""GPU copies: one copy of a model's weights per GPU, mapped by every process that computes on it.

``SharedModel(loader, key=..., share=Processes(device="cuda:0"))`` first shares the model in host memory as usual
(a segment: loaded once per machine). Then the first process to want it on GPU 0 allocates CUDA
VMM memory (``cuda``), copies the segment's torch buffers into it, exports it as a descriptor and
starts its keeper (``keeper``); every later process gets the descriptor from the keeper and
maps the same memory. Each process rebuilds the model with its tensors pointing into its mapping:
forward passes run locally, on one copy of the weights, with no call crossing a process.

Lifetime: a process's mapping lives while any tensor built on it does (the tensors hold this
module's :class:`DeviceCopy`); when the last dies it unmaps and closes its connection to the
keeper, which is its hold. The memory is freed by the driver when the keeper has let go (after the
last holder) and the last mapping is gone -- whichever processes were SIGKILLed on the way.

Admission: before allocating, the copy's size (known from the segment's manifest) is checked
against the device's free memory and against the GPU budget, if one is given (the sum of this
directory's live copies on that device, plus this one); a refusal is a
:class:`GpuMemoryExceeded` (a ``MemoryBudgetExceeded``) naming the model, its size and what is
free -- never a CUDA out-of-memory error halfway through.

What goes to the GPU: every torch storage of the model (parameters, buffers, tensors in plain
attributes), packed at 256-byte alignment in manifest order, so every process computes the same
layout. Other buffers (numpy arrays) stay in host memory. The copy is mapped read-only where the
driver allows it: a model that writes into its own weights fails in the writing process instead of
changing every other process's model.
"""

from __future__ import annotations

import os
import socket
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import _process
from .._host.directory import SegmentName
from .._host.format import Mapping
from .._host.waiting import Deadline
from .._modes.processes import parse_device
from ..budget import format_size
from ..errors import (
    AcquireTimeoutError,
    CudaError,
    DeviceCopyMismatchError,
    DeviceUnavailableError,
    EncodeError,
    GpuMemoryExceeded,
)
from .cuda import Driver, driver
from .keeper import (
    DeviceCopyFiles,
    list_device_copies,
    read_status,
    request_copy,
    start_keeper,
)

__all__ = ["DeviceCopy", "check_device", "device_driver", "open_device_copy", "device_layout", "admit"]

ALIGN = 256  # what cudaMalloc guarantees: every kernel's vectorised loads are aligned


@dataclass(frozen=True)
class DeviceLayout:
    """Where each torch buffer of a segment lies in its GPU copy: {buffer index: offset}, total bytes."""

    offsets: dict[int, int]
    nbytes: int


def device_layout(manifest: list[dict[str, Any]]) -> DeviceLayout:
    """The GPU layout of a segment's torch buffers, the same in every process."""
    offsets, end = {}, 0
    for index, entry in enumerate(manifest):
        info = entry.get("info", {})
        if "torch_storage" in info or "torchscript" in info:
            offsets[index] = end
            end = (end + entry["nbytes"] + ALIGN - 1) // ALIGN * ALIGN
    return DeviceLayout(offsets, end)


class DeviceCopy(_process.Resource):
    """This process's mapping of one GPU copy (see the module docstring for its lifetime); one of
    this process's resources for as long as tensors use it."""

    def __init__(self, index: int, address: int, nbytes: int, layout: DeviceLayout, lease: socket.socket) -> None:
        self.index = index
        self.device = f"cuda:{index}"
        self.address = address
        self.nbytes = nbytes
        self.layout = layout
        self._lease = lease
        self._finalizer = weakref.finalize(self, _let_go, index, address, nbytes, lease)
        self._finalizer.atexit = False  # at exit the driver unmaps and the kernel closes the lease
        _process.track(self, weak=True)

    def address_of(self, buffer: int) -> int:
        """The device address of segment buffer ``buffer`` in this mapping."""
        return self.address + self.layout.offsets[buffer]

    def after_fork_in_child(self) -> None:
        # a forked child cannot use CUDA and must not keep the parent's hold alive (closing its
        # descriptor of the lease leaves the parent's open)
        self._finalizer.detach()
        self._lease.close()


def _let_go(index: int, address: int, nbytes: int, lease: socket.socket) -> None:
    try:
        driver("unmapping a GPU copy").unmap(index, address, nbytes)
    finally:
        lease.close()


def device_driver(device: str, key: str) -> tuple[Driver, int]:
    """The CUDA driver and the index of ``device``, or a clear error where this machine lacks either
    (checked before a model is loaded for a GPU it could not go to)."""
    index = parse_device(device)
    cuda = driver(f"device={device!r} for model {key!r}")
    if index >= cuda.device_count:
        raise DeviceUnavailableError(f"device={device!r} for model {key!r}: this machine has {cuda.device_count} "
                                     f"GPU(s), cuda:0 to cuda:{cuda.device_count - 1}")
    return cuda, index


def check_device(device: str, *, key: str = "") -> int:
    """The index of ``device`` (``"cuda:N"``) if this machine can hold a GPU copy there (a CUDA
    driver with VMM, that many GPUs); else :class:`DeviceUnavailableError` saying why. ``key``: the
    model it is for, named in the error."""
    return device_driver(device, key)[1]


def open_device_copy(mapping: Mapping, name: SegmentName, device: str, *, key: str,
                     gpu_budget: Optional[int] = None, timeout: Optional[float] = None) -> DeviceCopy:
    """Map the copy of ``mapping``'s torch buffers on ``device``, making it if there is none."""
    cuda, index = device_driver(device, key)
    layout = device_layout(mapping.header["manifest"])
    if not layout.offsets:
        raise EncodeError(f"device={device!r} puts a model's torch tensors on the GPU, and model {key!r} "
                          f"(codec {mapping.header.get('codec')!r}) holds none; leave device= out to share it in "
                          "host memory")
    files = DeviceCopyFiles(name, cuda.uuid(index), index)
    deadline = Deadline(timeout)
    while True:
        found = _attach(cuda, files, layout, mapping.header["fingerprint"], key)
        if found is not None:
            return found
        with files.starting():
            if not files.alive():
                files.remove_stale()
                return _make(cuda, files, layout, mapping, key, gpu_budget)
        if deadline.expired():
            raise AcquireTimeoutError(f"the GPU copy of model {key!r} on {device} did not answer within "
                                      f"{timeout:g} s; see `modelshare ls`")
        deadline.sleep()  # a keeper leaving right now: look again


def _attach(cuda: Driver, files: DeviceCopyFiles, layout: DeviceLayout, fingerprint: str,
            key: str) -> Optional[DeviceCopy]:
    """Map the copy that a live keeper hands out, or None if there is no keeper to ask."""
    found = request_copy(files)
    if found is None:
        return None
    lease, about, memory_fd = found
    try:
        if about["fingerprint"] != fingerprint:
            raise DeviceCopyMismatchError(
                f"the GPU copy of model {key!r} on cuda:{files.index} was made from other weights than the "
                f"segment this process maps (pids {_holders(files)} still use it: a loader that is not "
                "deterministic, or a segment rewritten under them). Release the model in those processes, "
                "or give each model a version= of its own")
        address = cuda.import_mapped(files.index, memory_fd, about["nbytes"], about["read_only"])
    except BaseException:
        lease.close()
        raise
    finally:
        os.close(memory_fd)
    return DeviceCopy(files.index, address, about["nbytes"], layout, lease)


def _holders(files: DeviceCopyFiles) -> str:
    info = read_status(files)
    return ", ".join(map(str, info.holders)) if info else "?"


def _make(cuda: Driver, files: DeviceCopyFiles, layout: DeviceLayout, mapping: Mapping, key: str,
          gpu_budget: Optional[int]) -> DeviceCopy:
    """Admit, allocate, fill and export the copy, and start its keeper (start lock held)."""
    nbytes = cuda.rounded(files.index, layout.nbytes)
    admit(key, files, nbytes, cuda.memory_info(files.index), gpu_budget)
    address, memory_fd = cuda.create(files.index, nbytes)
    try:
        for buffer, offset in layout.offsets.items():
            view = mapping.buffers[buffer]
            if view.nbytes:
                cuda.copy_in(files.index, address + offset, np.frombuffer(view, np.uint8).ctypes.data, view.nbytes)
        cuda.synchronize(files.index)
        try:
            cuda.set_access(files.index, address, nbytes, read_only=True)
            read_only = True
        except CudaError:
            read_only = False  # this driver maps device memory read-write only
        lease = start_keeper(files, memory_fd, nbytes=nbytes, fingerprint=mapping.header["fingerprint"],
                             read_only=read_only, key=key)
    except BaseException:
        cuda.unmap(files.index, address, nbytes)
        raise
    finally:
        os.close(memory_fd)
    return DeviceCopy(files.index, address, nbytes, layout, lease)


def admit(key: str, files: DeviceCopyFiles, nbytes: int, memory: tuple[int, int], gpu_budget: Optional[int]) -> None:
    """Raise :class:`GpuMemoryExceeded` unless a copy of ``nbytes`` fits the GPU's free memory
    (``memory``: free, total) and ``gpu_budget`` (with this directory's live copies on that GPU)."""
    device = f"cuda:{files.index}"
    if gpu_budget is not None:
        held = [c for c in list_device_copies(files.name.directory) if c.uuid == files.gpu and c.alive]
        in_use = sum(c.nbytes for c in held)
        if in_use + nbytes > gpu_budget:
            holders = "; ".join(f"{c.key} {format_size(c.nbytes)} (pids {', '.join(map(str, c.holders))})"
                                for c in held) or "nothing"
            raise GpuMemoryExceeded(
                f"model {key!r} needs {format_size(nbytes)} on {device}; the GPU budget there is "
                f"{format_size(gpu_budget)} and {format_size(in_use)} of it is held: {holders}. Release a model on "
                f"{device}, raise the budget, or put this model on another GPU")
    free, total = memory
    if nbytes > free:
        raise GpuMemoryExceeded(
            f"model {key!r} needs {format_size(nbytes)} on {device}, which has {format_size(free)} free of "
            f"{format_size(total)}; free memory on that GPU (other processes, other models) or use another GPU")
