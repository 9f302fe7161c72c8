"""File-backed buffers: weights that are already pages of a file stay in that file.

A loader that memory-maps its weights file (``torch.load(mmap=True)``, safetensors, ``joblib``
``mmap_mode``, ``numpy.load(mmap_mode=...)``) hands the codec buffers that *are* the file's page
cache. Copying them into a tmpfs segment would double the bytes while the loader runs, charge
them to tmpfs (which the kernel cannot reclaim, only swap), and take time proportional to the
model. Instead the segment records where each such buffer lies -- the file's identity (device,
inode, size, mtime) and the offset -- and every process maps the file itself: one copy per
machine in the page cache, reclaimable under memory pressure (clean pages are re-read, not
OOM-killed), published in milliseconds.

What proves a buffer is the file's bytes, not something that only lives at an address in it:
``/proc/self/maps`` names the file and offset under the address, ``stat`` says the path still
names that inode, and ``/proc/self/pagemap`` says no page of the range was written in this
process (a private mapping's written page is anonymous memory, no longer the file). A buffer
that fails any of these is copied, as always.

The contract a mapped file needs: it is *replaced* (written elsewhere, then renamed over), never
rewritten in place -- a process mapping a file sees in-place writes, and one truncating it makes
readers fault (SIGBUS). ``Policy``: by default (``None``) only files that cannot be written (no
write permission bits, or a read-only mount: container images, package caches) are mapped;
``True`` maps any regular file (the user vouches for the contract); ``False`` always copies.
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import SegmentCorruptedError

__all__ = ["FileIdentity", "FilePages", "locate", "map_file", "changed", "FILE_CHANGED"]

#: The ``reason`` of the ``SegmentCorruptedError`` a segment whose weights file changed raises.
FILE_CHANGED = "weights file changed"

_PAGE = mmap.PAGESIZE
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61


@dataclass(frozen=True)
class FileIdentity:
    """A weights file as published: its path and what says it is still the same bytes."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> "FileIdentity":
        return cls(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def from_header(cls, entry: Any) -> "FileIdentity":
        """The identity a segment header records (its fields checked by the header's own check)."""
        return cls(str(entry["path"]), *(int(entry[k]) for k in ("dev", "ino", "size", "mtime_ns")))

    def to_header(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, st: os.stat_result) -> bool:
        return (stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                == (self.dev, self.ino, self.size, self.mtime_ns))


@dataclass
class FilePages:
    """Which of a model's buffers are pages of which files: ``where[i]`` is (file index, offset)
    for buffer ``i``, or None for a buffer to copy into the segment."""

    files: list[FileIdentity]
    where: list[Optional[tuple[int, int]]]


@dataclass(frozen=True)
class _Area:
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    ino: int
    path: str


def _areas_holding(addresses: Sequence[int]) -> list[_Area]:
    """This process's file mappings (``/proc/self/maps``) that hold one of ``addresses`` (sorted), by
    start. Only those lines are parsed past their address range: a process with scipy or torch
    loaded maps thousands of files (parsing every line took 12-22 ms of a 17 ms publish)."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            dash = line.index("-")
            space = line.index(" ", dash)
            start, end = int(line[:dash], 16), int(line[dash + 1:space], 16)
            at = bisect.bisect_left(addresses, start)
            if at == len(addresses) or addresses[at] >= end:
                continue  # holds none of them
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue  # anonymous memory, [heap], [stack], memfd...
            _, perms, offset, dev, ino, path = parts
            major, minor = (int(x, 16) for x in dev.split(":"))
            found.append(_Area(start, end, perms, int(offset, 16), (major, minor), int(ino), path.rstrip("\n")))
    return found


def _address(view: memoryview) -> int:
    import numpy

    return int(numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data)


def _untouched(pagemap: int, start: int, nbytes: int) -> bool:
    """Whether no page of [start, start + nbytes) is anonymous memory in this process (a private
    mapping's page that was written, or swapped out), per ``/proc/self/pagemap`` (open at ``pagemap``)."""
    import numpy  # one entry per 4 KiB page: 65,536 for 256 MiB, too many for a Python loop

    first, last = start // _PAGE, (start + nbytes - 1) // _PAGE
    raw = os.pread(pagemap, 8 * (last - first + 1), 8 * first)
    if len(raw) != 8 * (last - first + 1):
        return False
    entries = numpy.frombuffer(raw, dtype="<u8")
    anonymous = (entries & numpy.uint64(_PRESENT | _FILE_PAGE)) == numpy.uint64(_PRESENT)
    return not bool(((entries & numpy.uint64(_SWAPPED)) != 0).any() or anonymous.any())


def _writable(path: str, st: os.stat_result) -> bool:
    """Whether anyone could rewrite the file in place: write bits set on a writable mount."""
    return bool(st.st_mode & 0o222) and not os.statvfs(path).f_flag & os.ST_RDONLY


def locate(buffers: Sequence[memoryview], *, policy: Optional[bool], exclude: Path) -> FilePages:
    """Find which ``buffers`` are untouched pages of a regular file outside ``exclude`` (the segment
    directory: segments are never mapped from one another) that ``policy`` allows mapping."""
    pages = FilePages([], [None] * len(buffers))
    if policy is False or not buffers or not os.path.exists("/proc/self/maps"):
        return pages
    addresses = [_address(view) if view.nbytes else 0 for view in buffers]
    areas = _areas_holding(sorted(addresses))
    starts = [a.start for a in areas]
    index: dict[tuple[int, int], int] = {}
    allowed: dict[tuple[str, tuple[int, int], int], Optional[os.stat_result]] = {}
    excluded = os.path.realpath(exclude) + os.sep
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for i, view in enumerate(buffers):
            if view.nbytes == 0:
                continue
            start = addresses[i]
            at = bisect.bisect_right(starts, start) - 1
            area = areas[at] if at >= 0 and start + view.nbytes <= areas[at].end else None
            if area is None or area.path.startswith(excluded) or ("w" in area.perms and "s" in area.perms):
                continue  # not one file's pages, one of ours, or shared-writable (this process may write the file)
            name = (area.path, area.dev, area.ino)
            if name not in allowed:
                allowed[name] = _mappable(area, policy)
            st = allowed[name]
            if st is None or not _untouched(pagemap, start, view.nbytes):
                continue
            file_index = index.setdefault((st.st_dev, st.st_ino), len(pages.files))
            if file_index == len(pages.files):
                pages.files.append(FileIdentity.of(area.path, st))
            pages.where[i] = (file_index, area.offset + start - area.start)
    finally:
        os.close(pagemap)
    return pages


def _mappable(area: _Area, policy: Optional[bool]) -> Optional[os.stat_result]:
    """The stat of ``area``'s file if its path still names that regular file and ``policy`` allows
    mapping it, else None."""
    try:
        st = os.stat(area.path)
    except OSError:
        return None  # deleted or renamed since it was mapped
    if ((st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) != (area.ino, *area.dev)
            or not stat.S_ISREG(st.st_mode) or (policy is None and _writable(area.path, st))):
        return None
    return st


def _changed_error(identity: FileIdentity, segment: Path, why: str) -> SegmentCorruptedError:
    return SegmentCorruptedError(
        f"segment {segment} maps its weights from {identity.path}, which {why} since it was published. "
        "A mapped weights file must be replaced (written elsewhere and renamed over), not rewritten in "
        "place; name it in watch= (or use a loader that names its files) so that a new file is a new "
        "version. Remove the stale segment with `modelshare gc` once no process uses it",
        reason=FILE_CHANGED)


def map_file(identity: FileIdentity, segment: Path, *, copy_on_write: bool) -> mmap.mmap:
    """Map the weights file ``identity`` names, after checking it is still that file, unchanged."""
    try:
        fd = os.open(identity.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise _changed_error(identity, segment, f"cannot be opened ({exc.strerror})") from exc
    try:
        if not identity.matches(os.fstat(fd)):
            raise _changed_error(identity, segment, "was replaced or modified")
        if copy_on_write:
            return mmap.mmap(fd, identity.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return mmap.mmap(fd, identity.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def changed(identity: FileIdentity, segment: Path) -> Optional[SegmentCorruptedError]:
    """The error to raise if the file at ``identity.path`` is no longer the published one."""
    try:
        st = os.stat(identity.path, follow_symlinks=False)
    except OSError as exc:
        return _changed_error(identity, segment, f"cannot be read ({exc.strerror})")
    return None if identity.matches(st) else _changed_error(identity, segment, "was replaced or modified")
