"""The segment file format: write one atomically, validate and map one read-only.

A segment is one file (little-endian), small enough to describe in a paragraph::

    [0, 64)            preamble: magic b"MODLSHR\\0", format version (u32), flags (u32; bit 0 =
                       keep warm), header length (u64), data offset (u64), file size (u64),
                       CRC-32 of the header (u32), CRC-32 of the preamble's first 44 bytes (u32),
                       zero padding
    [64, 64+hlen)      header: UTF-8 JSON -- key, version, codec, views, created, loader pid,
                       skeleton {offset, nbytes, crc32}, manifest [{offset, nbytes, crc32, info}],
                       fingerprint, files [{path, dev, ino, size, mtime_ns}]
    [data offset, ...) data, page-aligned: the skeleton, then each buffer at a 64-byte-aligned
                       offset (offsets in the header are relative to the data offset)

A buffer that is already the pages of a weights file (``file_pages``) is not copied: its manifest
entry adds ``file`` (an index into ``files``) and ``file_offset``, and its place in the data is a
hole -- the file keeps its full size, which is what ``ls`` and a budget count (those bytes are
memory the model takes, in the page cache instead of tmpfs), while tmpfs stores only what was
written. Such a buffer has no CRC (reading it at publish is what mapping avoids): the file's
identity is checked instead, each time it is mapped.

Every byte that decides how a segment is read is checked each time it is mapped: the preamble
(flags included) and the header by their CRC-32s, the header's shape field by field, and the
skeleton by its CRC-32 -- a flip anywhere there is a :class:`SegmentCorruptedError`, never a model
decoded wrong. The buffers (the weights) are checked on demand, ``Mapping.verify()``: each has its
CRC-32, and the fingerprint (a 256-bit BLAKE2b over the skeleton and each buffer's size and CRC-32) names
the version. The writer fills a temporary file next to the final name and renames it: a reader
never sees half a segment. Who may write and when is ``segments``' business, not this module's.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

from .._fingerprint import blake2b
from ..codecs import Encoded, SegmentBuffers
from ..errors import SegmentCorruptedError, UntrustedFileError
from .directory import directory_error
from .file_pages import FileIdentity, FilePages, changed, map_file
from .trust import open_own

MAGIC = b"MODLSHR\x00"
FORMAT_VERSION = 3
FLAG_KEEP_WARM = 1
_PREAMBLE = struct.Struct("<8sIIQQQII")  # ... header CRC, preamble CRC (over the bytes before it)
_PREAMBLE_CHECKED = _PREAMBLE.size - 4
PREAMBLE_SIZE = 64
DATA_ALIGN = 4096
BUFFER_ALIGN = 64
MAX_HEADER = 64 << 20
_WRITE_CHUNK = 1 << 30


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _WRITE_CHUNK], offset + done)


def _layout(fields: dict[str, Any], encoded: Encoded,
            file_pages: Optional[FilePages]) -> tuple[dict[str, Any], int, int]:
    """Where everything of ``encoded`` goes: (header with room for the checksums, data offset, file size)."""
    skeleton = memoryview(encoded.skeleton)
    offset = _align(len(skeleton), BUFFER_ALIGN)
    manifest = []
    for i, buf in enumerate(encoded.buffers):
        entry = {"offset": offset, "nbytes": buf.nbytes, "crc32": 0,
                 "info": encoded.buffer_info[i] if i < len(encoded.buffer_info) else {}}
        where = file_pages.where[i] if file_pages is not None else None
        if where is not None:
            entry["file"], entry["file_offset"] = where
        manifest.append(entry)
        offset = _align(offset + buf.nbytes, BUFFER_ALIGN)
    files = [f.to_header() for f in file_pages.files] if file_pages is not None else []
    header = dict(fields, skeleton={"offset": 0, "nbytes": len(skeleton), "crc32": zlib.crc32(skeleton)},
                  manifest=manifest, fingerprint="0" * 64, files=files)
    header_len = len(json.dumps(header).encode()) + 32 * len(manifest) + 64
    data_offset = _align(PREAMBLE_SIZE + header_len, DATA_ALIGN)
    return header, data_offset, data_offset + offset


def segment_size(fields: dict[str, Any], encoded: Encoded, file_pages: Optional[FilePages] = None) -> int:
    """The exact size of the file ``write_segment`` would write: known before a byte is written."""
    return _layout(fields, encoded, file_pages)[2]


def _reserve(fd: int, data_offset: int, size: int, manifest: list[dict[str, Any]], skeleton_nbytes: int) -> None:
    """Allocate the file's room up front (so a full tmpfs fails here, not half-way): all of it, or,
    where buffers stay in their weights files, only what is written (their places stay holes)."""
    if not any("file" in e for e in manifest):
        os.posix_fallocate(fd, 0, size)
        return
    os.ftruncate(fd, size)
    os.posix_fallocate(fd, 0, data_offset + skeleton_nbytes)
    for entry in manifest:
        if "file" not in entry and entry["nbytes"]:
            os.posix_fallocate(fd, data_offset + entry["offset"], entry["nbytes"])


def write_segment(path: Path, temporary: Path, fields: dict[str, Any], encoded: Encoded, *, keep_warm: bool,
                  file_pages: Optional[FilePages] = None) -> None:
    """Write ``encoded`` as the segment ``path``: into ``temporary`` first, then an atomic rename.
    Buffers that ``file_pages`` places in weights files are recorded there, not copied.

    The caller makes sure it is the only writer of ``path`` (``segments`` holds a lock).
    """
    skeleton = memoryview(encoded.skeleton)
    header, data_offset, size = _layout(fields, encoded, file_pages)
    manifest = header["manifest"]
    try:
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise directory_error(exc, path.parent, size) from exc
    try:
        try:
            _reserve(fd, data_offset, size, manifest, len(skeleton))
        except OSError as exc:
            raise directory_error(exc, path.parent, size) from exc
        fingerprint = blake2b(bytes(skeleton), digest_size=32)
        _pwrite_all(fd, skeleton, data_offset)
        for entry, buf in zip(manifest, encoded.buffers):
            if "file" in entry:  # named by the file's identity, not its bytes
                identity = header["files"][entry["file"]]
                fingerprint.update(json.dumps([entry["nbytes"], entry["file_offset"], identity]).encode())
                continue
            view = memoryview(buf)
            entry["crc32"] = zlib.crc32(view)
            fingerprint.update(struct.pack("<QI", entry["nbytes"], entry["crc32"]))
            _pwrite_all(fd, view, data_offset + entry["offset"])
        header["fingerprint"] = fingerprint.hexdigest()
        header_bytes = json.dumps(header).encode()
        if PREAMBLE_SIZE + len(header_bytes) > data_offset:  # pragma: no cover - sized above
            raise AssertionError("segment header outgrew its reserved room")
        os.pwrite(fd, header_bytes, PREAMBLE_SIZE)
        preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, FLAG_KEEP_WARM if keep_warm else 0,
                                  len(header_bytes), data_offset, size, zlib.crc32(header_bytes), 0)
        os.pwrite(fd, preamble[:_PREAMBLE_CHECKED] + struct.pack("<I", zlib.crc32(preamble[:_PREAMBLE_CHECKED])), 0)
        os.close(fd)
        fd = -1
        os.rename(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
        raise


VIEWS_READ_ONLY = "read-only"
VIEWS_COPY_ON_WRITE = "copy-on-write"


class Mapping:
    """A segment mapped into this process: its header, skeleton and buffer views.

    The header's ``views`` says how: ``read-only`` (a write raises, as numpy does) or
    ``copy-on-write`` (for frameworks whose tensors cannot be read-only: a write copies the
    touched pages into this process, never into the segment other processes see).
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)
        self.header, data_offset, self.flags = read_header(path, fd, st.st_size)
        copy_on_write = self.header["views"] == VIEWS_COPY_ON_WRITE
        if copy_on_write:
            segment = mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            segment = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self._maps = [segment]  # the segment, then each weights file it maps
        whole = memoryview(segment)
        sk = self.header["skeleton"]
        self.skeleton = whole[data_offset + sk["offset"] : data_offset + sk["offset"] + sk["nbytes"]]
        self._whole = whole
        self.files = [FileIdentity.from_header(f) for f in self.header["files"]]
        self.buffers = SegmentBuffers([])
        try:
            if zlib.crc32(self.skeleton) != sk["crc32"]:
                raise _corrupt(path, "the skeleton does not match its checksum")
            for identity in self.files:
                self._maps.append(map_file(identity, path, copy_on_write=copy_on_write))
        except BaseException:
            self.close()
            raise
        files = [memoryview(m) for m in self._maps[1:]]
        manifest = self.header["manifest"]
        views = [files[e["file"]][e["file_offset"] : e["file_offset"] + e["nbytes"]] if "file" in e
                 else whole[data_offset + e["offset"] : data_offset + e["offset"] + e["nbytes"]] for e in manifest]
        locations = [(Path(self.files[e["file"]].path), e["file_offset"]) if "file" in e
                     else (path, data_offset + e["offset"]) for e in manifest]
        self.buffers = SegmentBuffers(views, locations)
        self._file_views = files
        self.nbytes = st.st_size

    @property
    def keep_warm(self) -> bool:
        return bool(self.flags & FLAG_KEEP_WARM)

    def verify(self) -> None:
        """Recompute every buffer's CRC-32 (the weights: not checked on attach, as they are large),
        and check that the weights files mapped are still the ones published; raise
        :class:`SegmentCorruptedError` naming the first that does not match."""
        self.check_files()
        for i, (entry, buf) in enumerate(zip(self.header["manifest"], self.buffers)):
            if "file" not in entry and zlib.crc32(buf) != entry["crc32"]:
                raise SegmentCorruptedError(
                    f"segment {self.path}: buffer {i} ({entry['nbytes']} bytes) does not match its "
                    "checksum; the file was modified after publishing. Remove it "
                    "(`modelshare gc --all`, once no process uses it) and load again", reason=f"buffer {i} damaged"
                )

    def check_files(self) -> None:
        """Raise :class:`SegmentCorruptedError` (``FILE_CHANGED``) if a weights file this segment maps
        is no longer at its path: a codec that reopened it there (ONNX Runtime) may have read another
        file's bytes."""
        for identity in self.files:
            error = changed(identity, self.path)
            if error is not None:
                raise error

    def close(self) -> bool:
        """Drop this mapping's own views and unmap, unless the model still uses them; whether it
        unmapped now. Arrays built on the buffers keep the mapping alive until the last dies
        (``when_unmapped`` says when)."""
        for view in [self.skeleton, *self.buffers, self._whole, *getattr(self, "_file_views", ())]:
            try:
                view.release()
            except BufferError:
                pass
        self.buffers = SegmentBuffers([])
        still_mapped = []
        for mapped in self._maps:
            try:
                mapped.close()
            except BufferError:
                still_mapped.append(mapped)
        self._maps = still_mapped
        return not still_mapped

    def when_unmapped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the mapping is gone (after ``close``): when the last array or tensor
        on it or on a weights file it maps dies. (Not at exit: what is still mapped then is given
        back by ``_process``'s exit hook.)"""
        maps = self._maps
        remaining = [len(maps)]

        def one_gone() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                callback()

        for mapped in maps:
            weakref.finalize(mapped, one_gone).atexit = False


def _corrupt(path: Path, why: str) -> SegmentCorruptedError:
    return SegmentCorruptedError(
        f"segment file {path} is not a valid modelshare segment: {why}. It was truncated or "
        "overwritten after publishing. Remove it with `modelshare gc --all` (or delete the file "
        "once no process uses it) and acquire again to reload the model", reason=why)


def _preamble(path: Path, fd: int) -> tuple[int, int, int, int, int, int]:
    """The checked preamble: (version, flags, header length, data offset, size, header CRC)."""
    raw = os.pread(fd, PREAMBLE_SIZE, 0)
    if len(raw) < PREAMBLE_SIZE:
        raise _corrupt(path, f"only {len(raw)} bytes long")
    magic, version, flags, header_len, data_offset, size, header_crc, crc = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC:
        raise _corrupt(path, "bad magic number")
    if version != FORMAT_VERSION:
        raise SegmentCorruptedError(
            f"segment file {path} has format version {version}, this modelshare reads version "
            f"{FORMAT_VERSION}; remove it with `modelshare gc --all` or use a matching modelshare",
            reason=f"format version {version}")
    if zlib.crc32(raw[:_PREAMBLE_CHECKED]) != crc:
        raise _corrupt(path, "preamble checksum mismatch")
    return version, flags, header_len, data_offset, size, header_crc


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _region_ok(region: Any, data_size: int) -> bool:
    return (isinstance(region, dict) and _is_size(region.get("offset")) and _is_size(region.get("nbytes"))
            and _is_size(region.get("crc32")) and region["offset"] + region["nbytes"] <= data_size)


def _file_ok(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"].startswith("/")
            and all(_is_size(entry.get(k)) for k in ("dev", "ino", "size", "mtime_ns")))


def _check_header(path: Path, header: Any, data_size: int) -> None:
    """Every field a reader acts on has the type and range it must (the CRC says the bytes are the
    writer's; this says the writer was a modelshare)."""
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not an object")
    if not _region_ok(header.get("skeleton"), data_size):
        raise _corrupt(path, "the skeleton lies outside the file or has no checksum")
    manifest = header.get("manifest")
    if not isinstance(manifest, list) or not all(_region_ok(e, data_size) and isinstance(e.get("info", {}), dict)
                                                 for e in manifest):
        raise _corrupt(path, "a buffer lies outside the file or has no checksum")
    files = header.get("files")
    if not isinstance(files, list) or not all(_file_ok(f) for f in files):
        raise _corrupt(path, "a weights file it maps is not named with its identity")
    for entry in manifest:
        if "file" in entry and not (isinstance(entry["file"], int) and 0 <= entry["file"] < len(files)
                                    and _is_size(entry.get("file_offset"))
                                    and entry["file_offset"] + entry["nbytes"] <= files[entry["file"]]["size"]):
            raise _corrupt(path, "a buffer lies outside the weights file it maps")
    if not isinstance(header.get("codec"), str) or header.get("views") not in (VIEWS_READ_ONLY, VIEWS_COPY_ON_WRITE):
        raise _corrupt(path, "the codec or the way to map the buffers is missing")
    if not isinstance(header.get("fingerprint", ""), str) or not isinstance(header.get("key", ""), str):
        raise _corrupt(path, "the key or fingerprint is not text")


def read_header(path: Path, fd: int, file_size: int) -> tuple[dict[str, Any], int, int]:
    """Validate a segment's preamble and header; return (header, data offset, flags)."""
    _version, flags, header_len, data_offset, size, header_crc = _preamble(path, fd)
    if size != file_size:
        raise _corrupt(path, f"{file_size} bytes long, its header says {size}")
    if not (0 < header_len <= MAX_HEADER and PREAMBLE_SIZE + header_len <= data_offset <= size):
        raise _corrupt(path, "header length or data offset out of range")
    header_bytes = os.pread(fd, header_len, PREAMBLE_SIZE)
    if zlib.crc32(header_bytes) != header_crc:
        raise _corrupt(path, "header checksum mismatch")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise _corrupt(path, f"header is not JSON ({exc})") from exc
    _check_header(path, header, size - data_offset)
    return header, data_offset, flags


def try_map(path: Path) -> Optional[Mapping]:
    """The segment at ``path`` mapped and checked, or None if there is none (a file that is not
    this uid's regular file raises :class:`UntrustedFileError`)."""
    try:
        fd = open_own(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return Mapping(path, fd)
    finally:
        os.close(fd)


def is_warm(path: Path) -> bool:
    """Whether the segment at ``path`` was published with keep warm (False for anything that is not
    a segment; a segment of another format version is taken at its word: gc keeps it unless asked)."""
    try:
        fd = open_own(path, os.O_RDONLY)
    except (FileNotFoundError, UntrustedFileError):
        return False
    try:
        return bool(_preamble(path, fd)[1] & FLAG_KEEP_WARM)
    except SegmentCorruptedError as exc:
        if not exc.reason.startswith("format version"):
            return False
        return bool(_PREAMBLE.unpack_from(os.pread(fd, PREAMBLE_SIZE, 0))[2] & FLAG_KEEP_WARM)
    finally:
        os.close(fd)
