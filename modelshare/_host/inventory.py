"""What a segment directory holds, and taking away what nobody holds.

* :func:`list_segments`: every segment (and segment being published) with its holders' pids;
* :func:`evict`: unlink one segment (kept warm or not) if no process holds it;
* :func:`sweep`: unlink every segment no live process holds and every orphaned temporary file --
  what SIGKILLed processes left (``modelshare gc``). Each process also sweeps a directory the
  first time it uses it (``sweep_leftovers``), but keeps complete segments whose holders all
  died: *orphans*, which the next acquire of their model adopts instead of loading again
  (``modelshare ls`` shows them as ``orphaned``; ``gc`` removes them).

A segment is only ever unlinked under the exclusive lock of its lock file, which no holder's
shared lock allows: what is in use is never taken away. And only modelshare's own files are
touched (``trust``): names it makes, this uid's regular files, in a directory that holds nothing
else -- anything else is skipped with an :class:`UntrustedFileWarning`, never read or deleted.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import SegmentCorruptedError, UntrustedFileError
from .directory import DirEntry, SegmentName, scan, split_name
from .file_pages import FileIdentity
from .format import FLAG_KEEP_WARM, is_warm, read_header
from .locks import LockTable, lock_file, lock_holders, lock_table
from .trust import check_own, foreign_names, open_own, warn_skipped

__all__ = ["SegmentInfo", "segment_names", "segment_sizes", "list_segments", "evict", "sweep", "sweep_leftovers"]


def segment_names(directory: Path) -> list[SegmentName]:
    """Every model version with a segment, lock or temporary file in ``directory``."""
    return list(_versions(directory))


def _versions(directory: Path) -> dict[SegmentName, list[DirEntry]]:
    """Each model version's segment, lock and temporary files, from one listing of ``directory``:
    this uid's regular files only (the others are skipped with a warning)."""
    found: dict[SegmentName, list[DirEntry]] = {}
    for entry in scan(directory):
        if entry.kind not in ("segment", "lock", "temporary"):
            continue
        try:
            check_own(os.lstat(entry.path), entry.path)
        except FileNotFoundError:
            continue  # gone since the listing
        except UntrustedFileError as exc:
            warn_skipped(exc)
            continue
        found.setdefault(entry.name, []).append(entry)
    return found


def segment_sizes(directory: Path) -> dict[str, int]:
    """Bytes each model version takes in ``directory`` -- its segment, or what is written of it --
    by stem, from one listing and no file read: what a budget counts."""
    sizes: dict[str, int] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return sizes
    for dir_entry in entries:
        split = split_name(dir_entry.name)
        if split is None or split[1] not in ("segment", "temporary"):
            continue
        try:
            st = dir_entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # renamed into place, or removed, since the listing
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
            sizes[split[0]] = sizes.get(split[0], 0) + st.st_size
    return sizes


def _temporaries(entries: list[DirEntry]) -> list[Path]:
    return [entry.path for entry in entries if entry.kind == "temporary"]


def evict(name: SegmentName) -> bool:
    """Unlink ``name``'s segment (kept warm or not) if no process holds it; whether it did.

    ``create=False``: a lock file that is gone cannot be locked anew, so a holder of a file unlinked
    under it is never mistaken for no holder.
    """
    try:
        fd = lock_file(name.lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
    except UntrustedFileError:
        return False  # not modelshare's to evict
    if fd is None:
        return False  # in use (or being published): never evicted
    try:
        for path in (*name.temporaries(), name.seg_path, name.lock_path):  # what a killed writer left counts too
            path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def sweep(directory: Path, *, include_warm: bool = False, dry_run: bool = False,
          orphans: bool = True) -> list[Path]:
    """Unlink every segment no live process holds, and every orphaned temporary file.

    Segments published with keep warm stay unless ``include_warm``; complete segments nobody holds
    (orphans: their holders died) stay unless ``orphans``. Returns what was (or, with
    ``dry_run``, would be) removed. A directory that holds files modelshare did not make is not
    dedicated to it and is never swept (an :class:`UntrustedFileWarning` says so).
    """
    foreign = foreign_names(directory)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        warn_skipped(UntrustedFileError(f"{directory} is not swept: it holds files modelshare did not make ({shown}); "
                                        "give modelshare a directory of its own"))
        return []
    removed: list[Path] = []
    for name, entries in _versions(directory).items():
        try:
            fd = lock_file(name.lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except UntrustedFileError as exc:
            warn_skipped(exc)
            continue
        if fd is None:
            continue  # held (or being published) by a live process
        try:
            doomed = _temporaries(entries)
            seg = name.seg_path
            own_seg = any(entry.kind == "segment" for entry in entries)
            keep_seg = own_seg and ((is_warm(seg) and not include_warm) or not orphans)
            if own_seg and not keep_seg:
                doomed.append(seg)
            if not keep_seg:
                doomed.append(name.lock_path)
            if not dry_run:
                for path in doomed:
                    path.unlink(missing_ok=True)
            removed.extend(p for p in doomed if p != name.lock_path)
        finally:
            os.close(fd)
    return removed


def sweep_leftovers(directory: Path) -> list[Path]:
    """What a process sweeps on first using ``directory``: crashes' half-written files and lock
    files, never a complete segment (an orphan is adopted by the next acquire of its model)."""
    return sweep(directory, orphans=False)


@dataclass
class SegmentInfo:
    """What ``modelshare ls`` shows about one segment."""

    path: Path
    key: str
    version: Optional[str]
    codec: str
    nbytes: int
    created: float
    holders: list[int]
    keep_warm: bool
    state: str  # "ready", "orphaned" (complete, no live holder, not kept warm), "publishing", or "corrupt: <why>"
    fingerprint: str = ""
    stem: str = ""  # <key>--<version hash>: the model version's name in the directory
    files: tuple[FileIdentity, ...] = ()  # weights files whose pages it maps instead of holding them

    @property
    def version_hash(self) -> str:
        return SegmentName(self.path.parent, self.stem).version


def list_segments(directory: Path) -> list[SegmentInfo]:
    """Every segment (and segment being published) in ``directory``, with its holders."""
    infos, locks = [], lock_table()
    for name, entries in _versions(directory).items():
        info = _segment_info(name, _temporaries(entries), locks)
        if info is not None:
            infos.append(info)
    return infos


def _segment_info(name: SegmentName, temporaries: list[Path], locks: LockTable) -> Optional[SegmentInfo]:
    holders = lock_holders(name.lock_path, locks)
    seg = name.seg_path
    try:
        fd = open_own(seg, os.O_RDONLY)
    except UntrustedFileError as exc:
        warn_skipped(exc)
        return None
    except FileNotFoundError:
        temps = []
        for path in temporaries:
            try:
                temps.append((path, path.stat()))
            except FileNotFoundError:
                pass  # renamed into place (or removed) since the listing: the next look sees it
        if not temps:
            return None
        return SegmentInfo(temps[0][0], name.key, None, "?", sum(st.st_size for _, st in temps), temps[0][1].st_mtime,
                           holders, False, "publishing", stem=name.stem)
    try:
        st = os.fstat(fd)
        try:
            header, _offset, flags = read_header(seg, fd, st.st_size)
        except SegmentCorruptedError as exc:
            return SegmentInfo(seg, name.key, None, "?", st.st_size, st.st_mtime, holders, False,
                               f"corrupt: {exc.reason}", stem=name.stem)
    finally:
        os.close(fd)
    return SegmentInfo(seg, header.get("key", name.key), header.get("version"), header.get("codec", "?"), st.st_size,
                       header.get("created", st.st_mtime), holders, bool(flags & FLAG_KEEP_WARM),
                       "ready" if holders or flags & FLAG_KEEP_WARM else "orphaned",
                       header.get("fingerprint", ""), stem=name.stem,
                       files=tuple(FileIdentity.from_header(f) for f in header["files"]))
