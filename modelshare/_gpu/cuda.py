"""The few CUDA driver calls a GPU copy needs, through ``ctypes`` on ``libcuda.so.1``.

Why the driver API and not a framework: the memory of a GPU copy must outlive the process that
made it. CUDA's virtual memory management (VMM) gives that: ``cuMemCreate`` makes physical memory
that can be exported as a file descriptor (``cuMemExportToShareableHandle``); another process
imports the descriptor and maps it into its own address space. The driver counts references --
every descriptor and every mapping -- and frees the memory when the last goes, whichever process
made it and however it ended. PyTorch's CUDA IPC (``cudaIpcGetMemHandle``) cannot: its memory dies
with the process that allocated it.

``ctypes`` keeps the core free of dependencies: the driver library is there wherever a GPU is,
and nothing here is imported until a model is asked for on a GPU. Every call runs in the device's
*primary* context, the one PyTorch and the CUDA runtime use, so mapped memory is ordinary device
memory to them. Struct layouts follow ``cuda.h`` (CUDA 11.2 to 13).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator, Optional

from ..errors import CudaError, DeviceUnavailableError

__all__ = ["Driver", "driver"]

_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_ON_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_READ, _READ_WRITE = 1, 3  # CU_MEM_ACCESS_FLAGS_PROT_*
_GRANULARITY_MINIMUM = 0


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_u64, _size, _ptr = ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_void_p
_SIGNATURES = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetUuid_v2": [ctypes.POINTER(_Uuid), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_ptr), ctypes.c_int],
    "cuCtxPushCurrent_v2": [_ptr],
    "cuCtxPopCurrent_v2": [ctypes.POINTER(_ptr)],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [ctypes.POINTER(_size), ctypes.POINTER(_size)],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(_size), ctypes.POINTER(_AllocationProp), ctypes.c_int],
    "cuMemCreate": [ctypes.POINTER(_u64), _size, ctypes.POINTER(_AllocationProp), _u64],
    "cuMemRelease": [_u64],
    "cuMemExportToShareableHandle": [_ptr, _u64, ctypes.c_int, _u64],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(_u64), _ptr, ctypes.c_int],
    "cuMemAddressReserve": [ctypes.POINTER(_u64), _size, _size, _u64, _u64],
    "cuMemAddressFree": [_u64, _size],
    "cuMemMap": [_u64, _size, _size, _u64, _u64],
    "cuMemUnmap": [_u64, _size],
    "cuMemSetAccess": [_u64, _size, ctypes.POINTER(_AccessDesc), _size],
    "cuMemcpyHtoD_v2": [_u64, _ptr, _size],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


class Driver:
    """The CUDA driver, loaded and initialised; one per process (see :func:`driver`)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        self._check("cuInit", 0)
        count = ctypes.c_int()
        self._check("cuDeviceGetCount", ctypes.byref(count))
        self.device_count = count.value
        self._contexts: dict[int, int] = {}
        self._lock = threading.Lock()

    def _check(self, name: str, *args: object) -> None:
        status = getattr(self._lib, name)(*args)
        if status:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(status, ctypes.byref(text))
            why = text.value.decode() if text.value else "unknown error"
            raise CudaError(f"{name} failed with CUDA error {status} ({why})")

    @contextlib.contextmanager
    def on(self, index: int) -> Iterator[None]:
        """Make device ``index``'s primary context current on this thread for the block."""
        with self._lock:
            context = self._contexts.get(index)
            if context is None:
                device, handle = ctypes.c_int(), _ptr()
                self._check("cuDeviceGet", ctypes.byref(device), index)
                self._check("cuDevicePrimaryCtxRetain", ctypes.byref(handle), device)
                context = self._contexts[index] = handle.value
        self._check("cuCtxPushCurrent_v2", _ptr(context))
        try:
            yield
        finally:
            self._lib.cuCtxPopCurrent_v2(ctypes.byref(_ptr()))

    def uuid(self, index: int) -> str:
        """Device ``index``'s UUID as hex: which physical GPU it is, whatever ``CUDA_VISIBLE_DEVICES``
        made its index in this process (NVML's ``GPU-...`` UUID, without the prefix and dashes)."""
        device, raw = ctypes.c_int(), _Uuid()
        self._check("cuDeviceGet", ctypes.byref(device), index)
        self._check("cuDeviceGetUuid_v2", ctypes.byref(raw), device)
        return bytes(raw.bytes).hex()

    def memory_info(self, index: int) -> tuple[int, int]:
        """(free, total) bytes of device ``index``, as its driver sees them now."""
        free, total = _size(), _size()
        with self.on(index):
            self._check("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def _prop(self, index: int) -> _AllocationProp:
        return _AllocationProp(type=_PINNED, requestedHandleTypes=_POSIX_FD, location=_Location(_ON_DEVICE, index))

    def rounded(self, index: int, nbytes: int) -> int:
        """``nbytes`` rounded up to what device ``index`` allocates in (2 MiB on current GPUs)."""
        granularity = _size()
        self._check("cuMemGetAllocationGranularity", ctypes.byref(granularity), ctypes.byref(self._prop(index)),
                    _GRANULARITY_MINIMUM)
        step = granularity.value
        return max(step, (nbytes + step - 1) // step * step)

    def create(self, index: int, nbytes: int) -> tuple[int, int]:
        """Allocate ``nbytes`` (rounded) on device ``index``, map it here read-write, and export it:
        (device address, file descriptor). The memory lives while the descriptor or a mapping does."""
        handle = _u64()
        fd = ctypes.c_int(-1)
        with self.on(index):
            self._check("cuMemCreate", ctypes.byref(handle), nbytes, ctypes.byref(self._prop(index)), 0)
            try:
                self._check("cuMemExportToShareableHandle", ctypes.byref(fd), handle, _POSIX_FD, 0)
                address = self._map(index, handle, nbytes, _READ_WRITE)
            except BaseException:
                if fd.value >= 0:
                    os.close(fd.value)
                raise
            finally:
                self._lib.cuMemRelease(handle)  # the descriptor and the mapping hold it now
        return address, fd.value

    def import_mapped(self, index: int, fd: int, nbytes: int, read_only: bool) -> int:
        """Map the memory behind an exported descriptor into this process; its device address.
        The caller still owns ``fd`` (close it: the mapping keeps the memory)."""
        handle = _u64()
        with self.on(index):
            self._check("cuMemImportFromShareableHandle", ctypes.byref(handle), _ptr(fd), _POSIX_FD)
            try:
                return self._map(index, handle, nbytes, _READ if read_only else _READ_WRITE)
            finally:
                self._lib.cuMemRelease(handle)

    def _map(self, index: int, handle: _u64, nbytes: int, access: int) -> int:
        address = _u64()
        self._check("cuMemAddressReserve", ctypes.byref(address), nbytes, 0, 0, 0)
        try:
            self._check("cuMemMap", address, nbytes, 0, handle, 0)
            try:
                self.set_access(index, address.value, nbytes, access == _READ)
            except BaseException:
                self._lib.cuMemUnmap(address, nbytes)
                raise
        except BaseException:
            self._lib.cuMemAddressFree(address, nbytes)
            raise
        return address.value

    def set_access(self, index: int, address: int, nbytes: int, read_only: bool) -> None:
        """Let this process's kernels read (and, unless ``read_only``, write) the mapped range."""
        desc = _AccessDesc(location=_Location(_ON_DEVICE, index), flags=_READ if read_only else _READ_WRITE)
        with self.on(index):
            self._check("cuMemSetAccess", _u64(address), nbytes, ctypes.byref(desc), 1)

    def copy_in(self, index: int, address: int, host_address: int, nbytes: int) -> None:
        """Copy ``nbytes`` from host memory to the device address (synchronous)."""
        with self.on(index):
            self._check("cuMemcpyHtoD_v2", _u64(address), _ptr(host_address), nbytes)

    def synchronize(self, index: int) -> None:
        """Wait for all work on device ``index`` in this process's context."""
        with self.on(index):
            self._check("cuCtxSynchronize")

    def unmap(self, index: int, address: int, nbytes: int) -> None:
        """Unmap a range from :meth:`create` or :meth:`import_mapped` (after the work on it is done)."""
        with self.on(index):
            self._check("cuCtxSynchronize")
            self._check("cuMemUnmap", _u64(address), nbytes)
            self._check("cuMemAddressFree", _u64(address), nbytes)


_driver: Optional[Driver] = None
_driver_lock = threading.Lock()


def driver(for_what: str) -> Driver:
    """The process's CUDA driver; :class:`DeviceUnavailableError` naming ``for_what`` where there is
    no NVIDIA driver or no GPU."""
    global _driver
    with _driver_lock:
        if _driver is None:
            try:
                _driver = Driver(ctypes.CDLL("libcuda.so.1"))
            except (OSError, AttributeError, CudaError) as exc:  # AttributeError: a driver older than CUDA 11.4
                raise DeviceUnavailableError(
                    f"{for_what} needs an NVIDIA GPU and its driver, and this machine has none usable "
                    f"({exc}). Run it where a GPU is, or leave device= out to share the weights in host memory"
                ) from None
        if _driver.device_count == 0:
            raise DeviceUnavailableError(f"{for_what}: the CUDA driver sees no GPU on this machine; leave "
                                         "device= out to share the weights in host memory")
        return _driver
