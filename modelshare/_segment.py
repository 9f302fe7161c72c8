"""Named shared-memory segments: one file per model version, published atomically, held by flocks.

The problem: N processes on a machine want the same weights. A segment is a file in a tmpfs
directory (``/dev/shm/modelshare-<uid>/`` by default) that holds them once; every process maps it
and reads the weights in place.

Each model version is one segment file ``<key>--<version hash>.seg`` (its format: see
``_segment_file``) beside a lock file ``<key>--<version hash>.lock``.

Lifetime rules:

* **Publish**: under an exclusive ``flock`` on ``<stem>.lock``, the loader writes
  ``<stem>.seg.tmp-<pid>-<random>`` and renames it to ``<stem>.seg``. A reader never sees half a
  segment; a writer killed mid-write leaves a temporary file that the next writer (or ``sweep``)
  removes, since holding the exclusive lock proves its writer is gone.
* **Hold**: every attached process holds a *shared* ``flock`` on the lock file. The kernel drops
  it when the process dies, SIGKILL included: there are no pid files to go stale.
* **Release**: the last holder to leave converts its lock to exclusive without blocking; if
  that succeeds nobody else holds the segment, and it unlinks the segment and the lock file
  (unless the segment was published with ``keep_warm``).
* **Sweep** (``modelshare gc``): whatever a crash left -- a segment whose holders were all
  killed, a half-written temporary -- is unlinked when a non-blocking exclusive lock succeeds.
* Lock files are only unlinked under their own exclusive lock, and whoever locks one checks
  afterwards that the path still names the file it locked, so two processes never end up
  holding locks on two different files of the same name.

Example::

    name = SegmentName.for_model(directory, "resnet", version_hash)
    handle, published = open_or_publish(name, produce=lambda: (fields, codec.encode(model), False))
    model = codec.decode(handle.mapping.skeleton, handle.mapping.buffers)
    ...
    release(handle)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ._segment_file import (
    FLAG_KEEP_WARM,
    TEMPORARY_INFIX,
    Mapping,
    directory_error,
    is_warm,
    read_header,
    try_map,
    write_segment,
)
from .codecs import Encoded
from .errors import (
    AcquireTimeoutError,
    InvalidKeyError,
    SegmentCorruptedError,
    SegmentDirectoryError,
)

_SEG, _LOCK = ".seg", ".lock"
_TMP = _SEG + TEMPORARY_INFIX
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,127}")


def default_directory() -> Path:
    """``$MODELSHARE_DIR`` if set, else ``/dev/shm/modelshare-<uid>`` (tmpfs: memory, not disk)."""
    env = os.environ.get("MODELSHARE_DIR")
    if env:
        return Path(env)
    return Path("/dev/shm") / f"modelshare-{os.getuid()}"


def ensure_directory(directory: Path) -> Path:
    """Create ``directory`` (mode 0700) if needed and check that this process can use it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SegmentDirectoryError(
            exc.errno,
            f"cannot create the segment directory {directory} ({exc.strerror}); pass "
            "directory=... or set MODELSHARE_DIR to a writable directory on tmpfs (e.g. /dev/shm)",
        ) from exc
    if not directory.is_dir():
        raise SegmentDirectoryError(
            errno.ENOTDIR, f"{directory} is not a directory; point MODELSHARE_DIR at a directory"
        )
    if directory.stat().st_uid != os.getuid() and directory == default_directory():
        raise SegmentDirectoryError(
            errno.EPERM,
            f"{directory} belongs to uid {directory.stat().st_uid}, not to this user "
            f"({os.getuid()}); remove it or set MODELSHARE_DIR to a directory of your own",
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise SegmentDirectoryError(
            errno.EACCES,
            f"no permission to write in the segment directory {directory}; fix its permissions "
            "or set MODELSHARE_DIR to a directory this user can write",
        )
    return directory


def key_from(text: str, fallback: str) -> str:
    """``text`` made into a valid key (other characters become ``_``), or ``fallback``."""
    key = re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)[:100]).lstrip(".-=+")
    return key if key and _KEY_RE.fullmatch(key) else fallback


def validate_key(key: str) -> str:
    """Return ``key`` if it can name a segment file, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or "--" in key:
        raise InvalidKeyError(
            f"model key {key!r} cannot name a segment: use 1-128 characters from letters, digits "
            "and '_.=+-', starting with a letter, digit or '_', without '--' (no '/', no spaces)"
        )
    return key


@dataclass(frozen=True)
class SegmentName:
    """Where one model version lives: ``<directory>/<key>--<version hash>{.seg,.lock}``."""

    directory: Path
    stem: str

    @classmethod
    def for_model(cls, directory: Path, key: str, version_hash: str) -> "SegmentName":
        return cls(Path(directory), f"{validate_key(key)}--{version_hash}")

    @property
    def seg_path(self) -> Path:
        return self.directory / (self.stem + _SEG)

    @property
    def lock_path(self) -> Path:
        return self.directory / (self.stem + _LOCK)


# ---------------------------------------------------------------------------------------------
# Locks: holders share, publishers and collectors exclude


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _flock(fd: int, op: int, timeout: Optional[float], what: str) -> None:
    if timeout is None:
        fcntl.flock(fd, op)
        return
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise AcquireTimeoutError(
                    f"waited {timeout:g} s for {what}; the process loading it is still at work "
                    "(see `modelshare ls`). Raise timeout=, or kill a stuck loader: its lock "
                    "is released when it dies"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def lock_file(path: Path, op: int, timeout: Optional[float] = None, *, create: bool = True) -> Optional[int]:
    """Open and ``flock`` ``path``; return the fd once the path still names the locked file.

    Returns None when ``create`` is false and the file does not exist, or when ``op`` includes
    ``LOCK_NB`` and the lock is taken.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise directory_error(exc, path.parent, 0) from exc
        try:
            if op & fcntl.LOCK_NB:
                fcntl.flock(fd, op)
            else:
                _flock(fd, op, timeout, f"the model at {path.with_suffix('')}")
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)
        if not create:
            return None


@dataclass
class SegmentHandle:
    """This process's hold on a segment: its shared lock and its mapping."""

    name: SegmentName
    lock_fd: int
    mapping: Mapping


Produce = Callable[[], "tuple[dict[str, Any], Encoded, bool]"]


def open_or_publish(
    name: SegmentName, produce: Produce, *, timeout: Optional[float] = None
) -> tuple[SegmentHandle, bool]:
    """Attach ``name``'s segment, publishing it first with ``produce()`` if nobody has.

    ``produce`` returns (header fields, encoded model, keep warm) and runs in at most one process
    at a time, under the exclusive lock. Returns the handle and whether this call published.
    """
    while True:
        fd = lock_file(name.lock_path, fcntl.LOCK_SH, timeout)
        assert fd is not None
        try:
            mapping = try_map(name.seg_path)
            if mapping is not None:
                return SegmentHandle(name, fd, mapping), False
            if not _lock_to_publish(fd, name, timeout) or not _same_file(fd, name.lock_path):
                os.close(fd)
                continue  # published by another process meanwhile (or the lock file was replaced)
            published = False
            mapping = try_map(name.seg_path)
            if mapping is None:
                _remove_temporaries(name)
                try:
                    _publish(name, produce)
                except BaseException:
                    # We hold the lock exclusively, so no one else uses this file; waiters
                    # notice it is gone and lock a fresh one.
                    name.lock_path.unlink(missing_ok=True)
                    raise
                published = True
                mapping = try_map(name.seg_path)
                assert mapping is not None
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _same_file(fd, name.lock_path) and _inode(name.seg_path) == mapping.inode:
                return SegmentHandle(name, fd, mapping), published
            mapping.close()
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise


def _lock_to_publish(fd: int, name: SegmentName, timeout: Optional[float]) -> bool:
    """Trade our shared lock for the exclusive one, to publish; False if the segment appeared first.

    Never blocks on the exclusive lock: a process that published and attached holds its shared
    lock for as long as it uses the model, so a blocking wait could last forever. A failed
    non-blocking conversion leaves no lock at all (flock converts by unlocking first); the caller
    then starts over and attaches.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if name.seg_path.exists():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                raise AcquireTimeoutError(
                    f"waited {timeout:g} s for the model at {name.directory / name.stem}; the process loading "
                    "it is still at work (see `modelshare ls`). Raise timeout=, or kill a stuck loader: its "
                    "lock is released when it dies"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _publish(name: SegmentName, produce: Produce) -> None:
    """Run ``produce`` and write its result; every reference to the model dies with this frame."""
    fields, encoded, keep_warm = produce()
    write_segment(name.seg_path, fields, encoded, keep_warm=keep_warm)


def _inode(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _remove_temporaries(name: SegmentName) -> None:
    """Remove ``name``'s half-written files; only valid while holding its exclusive lock."""
    for path in name.directory.glob(name.stem + _TMP + "*"):
        path.unlink(missing_ok=True)


class _Hold:
    """A shared lock that outlives ``release`` while the model still maps the segment."""

    def __init__(self, name: SegmentName, lock_fd: int, keep_warm: bool) -> None:
        self.name, self.lock_fd, self.keep_warm = name, lock_fd, keep_warm

    def drop(self) -> bool:
        """Give up the lock; unlink the segment if this was the last holder (unless kept warm)."""
        _lingering.pop(id(self), None)
        removed = False
        try:
            if not self.keep_warm:
                try:
                    fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass  # someone else holds it; our shared lock goes with the close below
                else:
                    if _same_file(self.lock_fd, self.name.lock_path):
                        self.name.seg_path.unlink(missing_ok=True)
                        self.name.lock_path.unlink(missing_ok=True)
                        removed = True
        finally:
            os.close(self.lock_fd)
        return removed


_lingering: dict[int, _Hold] = {}  # holds released while something in this process still maps the segment


def _relock_lingering_in_child() -> None:
    """A forked child shares its parent's lock descriptions: take shared locks of its own."""
    for hold in list(_lingering.values()):
        fd = lock_file(hold.name.lock_path, fcntl.LOCK_SH | fcntl.LOCK_NB, create=False)
        os.close(hold.lock_fd)  # the parent's lock survives: it has its own descriptor
        if fd is None:  # nothing to hold any more
            _lingering.pop(id(hold), None)
            hold.lock_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            hold.keep_warm = True  # never unlink anything on its account
        else:
            hold.lock_fd = fd


os.register_at_fork(after_in_child=_relock_lingering_in_child)


def forget_lingering(name: SegmentName) -> None:
    """Give up this process's released-but-still-mapped holds on ``name`` (so that it can be
    evicted): for a caller whose own leftover references are about to die, e.g. a loop variable
    still bound to the previous model while the next one is admitted."""
    for hold in [h for h in _lingering.values() if h.name == name]:
        _lingering.pop(id(hold), None)
        os.close(hold.lock_fd)
        hold.lock_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # what its finalizer will close
        hold.keep_warm = True  # and never unlink anything on its account


def release(handle: SegmentHandle) -> bool:
    """Give up this process's hold; unlink the segment if it was the last holder.

    Returns whether the segment was removed. A segment published with keep warm stays. While the
    model built on it is still referenced in this process (arrays, tensors on its pages), the
    hold lasts until the last such reference dies: a segment that is still mapped is never
    unlinked or evicted, and memory counted as free is free.
    """
    hold = _Hold(handle.name, handle.lock_fd, handle.mapping.keep_warm)
    if handle.mapping.close():
        return hold.drop()
    _lingering[id(hold)] = hold
    handle.mapping.when_unmapped(hold.drop)
    return False

# ---------------------------------------------------------------------------------------------
# Inspection and garbage collection


def _stems(directory: Path) -> list[str]:
    stems = set()
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    for entry in entries:
        for suffix in (_SEG, _LOCK):
            if entry.endswith(suffix):
                stems.add(entry[: -len(suffix)])
        if _TMP in entry:
            stems.add(entry.split(_TMP)[0])
    return sorted(stems)


def evict(name: SegmentName) -> bool:
    """Unlink ``name``'s segment (kept warm or not) if no process holds it; whether it did.

    ``create=False``: a lock file that is gone cannot be locked anew, so a holder of a file unlinked
    under it is never mistaken for no holder.
    """
    fd = lock_file(name.lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False)
    if fd is None:
        return False  # in use (or being published): never evicted
    try:
        name.seg_path.unlink(missing_ok=True)
        name.lock_path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def sweep(directory: Path, *, include_warm: bool = False, dry_run: bool = False) -> list[Path]:
    """Unlink every segment no live process holds, and every orphaned temporary file.

    Segments published with keep warm stay unless ``include_warm``. Returns what was (or, with
    ``dry_run``, would be) removed.
    """
    removed: list[Path] = []
    for stem in _stems(directory):
        name = SegmentName(directory, stem)
        fd = lock_file(name.lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:
            continue  # held (or being published) by a live process
        try:
            doomed = list(directory.glob(stem + _TMP + "*"))
            seg = name.seg_path
            keep_seg = seg.exists() and is_warm(seg) and not include_warm
            if seg.exists() and not keep_seg:
                doomed.append(seg)
            if not keep_seg:
                doomed.append(name.lock_path)
            if not dry_run:
                for path in doomed:
                    path.unlink(missing_ok=True)
            removed.extend(p for p in doomed if p.suffix != _LOCK)
        finally:
            os.close(fd)
    return removed


def lock_holders(lock_path: Path) -> list[int]:
    """Pids holding a ``flock`` on ``lock_path``, read from ``/proc/locks`` (no bookkeeping)."""
    try:
        st = os.stat(lock_path)
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return []
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        major, minor, inode = parts[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == want:
            pids.append(int(parts[4]))
    return sorted(set(pids))


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
    state: str  # "ready", "publishing", or "corrupt: <why>"
    fingerprint: str = ""


def list_segments(directory: Path) -> list[SegmentInfo]:
    """Every segment (and segment being published) in ``directory``, with its holders."""
    infos = []
    for stem in _stems(directory):
        name = SegmentName(directory, stem)
        holders = lock_holders(name.lock_path)
        key = stem.rsplit("--", 1)[0]
        seg = name.seg_path
        try:
            fd = os.open(seg, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            temps = []
            for path in directory.glob(stem + _TMP + "*"):
                try:
                    temps.append((path, path.stat()))
                except FileNotFoundError:
                    pass  # renamed into place (or removed) since the listing: the next look sees it
            if temps:
                infos.append(SegmentInfo(temps[0][0], key, None, "?", sum(st.st_size for _, st in temps),
                                         temps[0][1].st_mtime, holders, False, "publishing"))
            continue
        try:
            st = os.fstat(fd)
            try:
                header, _offset, flags = read_header(seg, fd, st.st_size)
            except SegmentCorruptedError as exc:
                infos.append(SegmentInfo(seg, key, None, "?", st.st_size, st.st_mtime, holders,
                                         False, f"corrupt: {getattr(exc, 'reason', exc)}"))
                continue
        finally:
            os.close(fd)
        infos.append(SegmentInfo(seg, header.get("key", key), header.get("version"), header.get("codec", "?"),
                                 st.st_size, header.get("created", st.st_mtime), holders,
                                 bool(flags & FLAG_KEEP_WARM), "ready", header.get("fingerprint", "")))
    return infos
