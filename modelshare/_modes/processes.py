"""``share="processes"``: one copy of the weights per machine, zero-copy views in every process.

The first process to ask runs the loader under the segment's exclusive lock, splits the model with
a codec and publishes the buffers in a segment (``_host.segments``); every other process maps the
segment and rebuilds the model over read-only views. Compute stays local: no call crosses a process.
The loading process keeps only the shared copy: its private model dies with the publishing frame,
and freed heap pages go back to the system (``malloc_trim``).

``device="cuda:N"`` goes one step further for PyTorch models: the segment's torch buffers are
copied once onto GPU N, and every process maps that copy and computes on it (``_gpu.copies``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from .. import _process
from .._host import counts, file_pages, inventory
from .._host.format import segment_size
from .._host.heap import reclaim_heap
from .._host.holds import SegmentHandle, forget_lingering, held_by_others, release
from .._host.locks import lock_holders
from .._host.segments import Publication, open_or_publish
from .._host.trust import ensure_directory
from .._log import Log
from ..budget import Size, format_size, parse_size
from ..codecs import SegmentBuffers
from ..errors import EncodeError, SegmentCorruptedError
from . import Hold, HoldInfo, Mode
from .pool import check_instances, pooled

if TYPE_CHECKING:
    from .._gpu.copies import DeviceCopy
    from .._host.format import Mapping
    from .._shared import SharedModel

_log = Log(__name__)

__all__ = ["Processes", "parse_device"]


def parse_device(device: Any) -> int:
    """The GPU index in ``"cuda"``, ``"cuda:N"`` (or a ``torch.device`` of either); ValueError otherwise."""
    text = str(device)
    kind, _, index = text.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise ValueError(f"device must be 'cuda' or 'cuda:N' (a GPU of this machine), not {device!r}; leave it "
                         "out to share the weights in host memory")
    return int(index or 0)


@dataclass(frozen=True)
class Processes(Mode):
    """One copy of the weights per machine, shared by every process (the default).

    Args:
        instances: N instances in each process over the one copy of the weights (an
            ``InstancePool``), for models that are not thread-safe.
        device: ``"cuda:N"`` puts the model's torch tensors in one copy on GPU N that every process
            maps and computes on locally; the loader returns the model on the CPU. Default: the
            weights stay in host memory.
        gpu_budget: with ``device``: bytes (or ``"20GiB"``) that this directory's GPU copies may
            take on that GPU together; a copy that would not fit raises ``GpuMemoryExceeded``.
        verify: check every buffer's checksum when attaching, not only the header and skeleton
            (which are always checked): a damaged weight is a ``SegmentCorruptedError`` instead
            of a wrong output, at the cost of reading the weights once (``docs/trust.md``).
        map_files: weights the loader memory-mapped from a file (``TorchStateDict``, ``JoblibMmap``,
            ``numpy.load(mmap_mode=...)``) stay in that file, and every process maps it: no copy,
            published in milliseconds, pages the kernel can reclaim (``_host.file_pages``). Default
            ``None``: only for files nobody can rewrite in place (no write permission, or a read-only
            mount); ``True``: any file (you replace weights files by renaming, never rewrite them in
            place); ``False``: always copy into the segment. The process that loads decides for the
            version it publishes.
    """

    instances: int = 1
    device: Optional[str] = None
    gpu_budget: Optional[Size] = None
    verify: bool = False
    map_files: Optional[bool] = None
    name: ClassVar[str] = "processes"

    def __post_init__(self) -> None:
        check_instances(self.instances)
        if self.device is not None:
            object.__setattr__(self, "device", f"cuda:{parse_device(self.device)}")
        if self.gpu_budget is not None:
            if self.device is None:
                raise ValueError("gpu_budget= limits the GPU copies of models placed with device='cuda:N'; "
                                 "pass device= too")
            object.__setattr__(self, "gpu_budget", parse_size(self.gpu_budget))

    def ident(self, shared: "SharedModel[Any]") -> tuple[str, ...]:
        return (*super().ident(shared), self.device or "")

    def holders(self, shared: "SharedModel[Any]") -> list[int]:
        return lock_holders(shared.segment_name.lock_path)

    def hold(self, shared: "SharedModel[Any]") -> Hold:
        start = time.perf_counter()
        if self.device is not None:
            from .._gpu.copies import device_driver

            device_driver(self.device, shared.key)  # no GPU here: say so before loading anything
        directory = ensure_directory(shared.directory)
        _process.sweep_once(directory, inventory.sweep_leftovers)
        try:
            handle, published = open_or_publish(
                shared.segment_name, lambda: _produce(shared, self.map_files, directory), timeout=shared.timeout)
            if published:  # the loader's garbage is young: a full collection would delay the first call
                reclaim_heap(generation=1)
            elif (adopted := _adopted(handle)) is None:  # its holders let it go as we looked: start over
                release(handle)
                return self.hold(shared)
            elif adopted and not _sound(handle):  # a damaged orphan: gone now, so this hold loads anew
                return self.hold(shared)
            model, buffers, new_instance = self._decode(shared, handle, verify=self.verify and not published)
        except SegmentCorruptedError as exc:
            if exc.reason != file_pages.FILE_CHANGED:
                raise
            forget_lingering(shared.segment_name)  # what this process built on it is gone with the exception
            if shared.segment_name.seg_path.exists() and not inventory.evict(shared.segment_name):
                raise
            _log.warning("%s; nobody held it: removed it, loading anew", exc.args[0].split(". ")[0])
            return self.hold(shared)
        device_bytes = buffers.device.nbytes if buffers.device is not None else 0
        info = HoldInfo(published, time.perf_counter() - start, handle.mapping.nbytes, device_bytes)
        _log.info("%s model %r (version %s, %s in %s) in %.3f s", "loaded" if published else "attached to",
                  shared.key, shared.version_hash, format_size(info.shared_bytes), handle.name.seg_path, info.seconds)
        counts.add(directory, shared.key, "loads" if published else "attaches")
        return _SegmentHold(model, info, handle, buffers.device, new_instance)

    def _decode(self, shared: "SharedModel[Any]", handle: SegmentHandle,
                verify: bool) -> tuple[Any, SegmentBuffers, Callable[[], Any]]:
        """The model rebuilt over ``handle``'s segment (released if that fails), its buffers, and how
        to build another instance. The weights files it maps are checked once more after decoding:
        a codec that reopened one by its path (ONNX Runtime) must have read the published file."""
        try:
            if verify:
                handle.mapping.verify()
            buffers = self._buffers(shared, handle.mapping)
            codec = shared._decoder(handle.mapping.header["codec"])

            def new_instance() -> Any:
                built = pooled([codec.decode(handle.mapping.skeleton, buffers) for _ in range(self.instances)])
                try:
                    handle.mapping.check_files()
                except SegmentCorruptedError:
                    del built  # not kept alive by the traceback: the stale segment can go
                    raise
                return built

            return new_instance(), buffers, new_instance
        except BaseException:
            release(handle)
            raise

    def _buffers(self, shared: "SharedModel[Any]", mapping: "Mapping") -> SegmentBuffers:
        """The segment's buffers, with the model's GPU copy where ``device`` asks for one (the copy
        lives as long as the tensors built on it; see ``_gpu.copies``)."""
        if self.device is None:
            return mapping.buffers
        from .._gpu.copies import open_device_copy

        gpu_budget = None if self.gpu_budget is None else parse_size(self.gpu_budget)
        placement = open_device_copy(mapping, shared.segment_name, self.device, key=shared.key,
                                     gpu_budget=gpu_budget, timeout=shared.timeout)
        return SegmentBuffers(mapping.buffers, mapping.buffers.locations, device=placement)


class _SegmentHold(Hold):
    """A model rebuilt over a segment this process holds (and, with ``device``, a GPU copy)."""

    def __init__(self, model: Any, info: HoldInfo, handle: SegmentHandle, device_copy: "Optional[DeviceCopy]",
                 rebuild: Callable[[], Any]) -> None:
        super().__init__(model, info, rebuild)
        self.handle: Optional[SegmentHandle] = handle
        self.device_copy = device_copy

    def release(self) -> None:
        super().release()
        handle, self.handle, self.device_copy = self.handle, None, None
        if handle is not None:
            release(handle, keep_warm=False if self.retired else None)

    def before_fork(self) -> None:
        if self.handle is not None:
            self.handle.before_fork()

    def fork_done(self) -> None:
        if self.handle is not None:
            self.handle.fork_done()

    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        if self.handle is not None:
            self.handle.after_fork_in_child()


def _adopted(handle: SegmentHandle) -> Optional[bool]:
    """Whether this attach adopts an orphan: a segment whose holders all died, now held by this
    process alone, not kept warm (its weights are checked before use: ``_sound``); None if the
    segment went away as this process looked (see ``held_by_others``)."""
    if handle.mapping.keep_warm:
        return False
    others = held_by_others(handle)
    if others is None:
        return None
    orphan = not others
    if orphan:
        _log.info("adopting %s: its holders died; checking its weights", handle.name.seg_path)
    return orphan


def _sound(handle: SegmentHandle) -> bool:
    """Whether an adopted orphan's weights match their checksums; if not, let it go and remove it
    (unless another process attached meanwhile), saying why."""
    try:
        handle.mapping.verify()
        return True
    except SegmentCorruptedError as exc:
        damage = exc.args[0]  # not the exception: its traceback would keep views of the mapping alive
    release(handle)  # as its last holder, this unlinks it
    forget_lingering(handle.name)
    if handle.name.seg_path.exists() and not inventory.evict(handle.name):
        raise SegmentCorruptedError(f"{damage} (another process holds it now)")
    _log.warning("%s; removed it, loading anew", damage)
    return False


def _produce(shared: "SharedModel[Any]", map_files: Optional[bool], directory: Path) -> Publication:
    """Load and encode the model, for publishing (runs under the segment's exclusive lock), finding
    which buffers may stay in their weights files. (What crashes left is swept when a process first
    uses the directory, and by ``modelshare gc``; a router evicts it when it needs the room.)"""
    model = shared._load()
    codec = shared._codec_for(model)
    try:
        encoded = codec.encode(model)
    except EncodeError:
        raise
    except Exception as exc:  # a codec's own failure (a RecursionError deep in an object graph) says the same
        raise EncodeError(f"the {codec.name} codec could not split model {shared.key!r} "
                          f"({type(model).__qualname__}) into shared weights: {type(exc).__name__}: {exc}. Use "
                          "share='threads' (one copy per process), or register a codec for this type") from exc
    fields = {
        "key": shared.key,
        "version": shared.version,
        "version_hash": shared.version_hash,
        "codec": codec.name,
        "views": encoded.views,
        "created": time.time(),
        "loader_pid": os.getpid(),
    }
    pages = file_pages.locate(encoded.buffers, policy=map_files, exclude=directory)
    if not codec.maps_files([Path(pages.files[w[0]].path) if w else None for w in pages.where]):
        pages = file_pages.FilePages([], [None] * len(encoded.buffers))
    if shared._admit_publish is not None:  # a router's: the exact size, before a byte is written
        shared._admit_publish(segment_size(fields, encoded, pages))
    return Publication(fields, encoded, shared.keep_warm, pages)
