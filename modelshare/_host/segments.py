"""Named shared-memory segments: each model version published once per machine, attached by all.

The problem: N processes on a machine want the same weights. A segment is a file in a tmpfs
directory (``/dev/shm/modelshare-<uid>/`` by default) that holds them once; every process maps it
and reads the weights in place. Each model version is one segment file ``<stem>.seg`` (its format:
``format``) beside a lock file ``<stem>.lock`` (names: ``directory``).

Lifetime rules:

* **Publish**: under an exclusive ``flock`` on ``<stem>.lock``, the loader writes a temporary
  file and renames it to ``<stem>.seg``. A reader never sees half a segment; a writer killed
  mid-write leaves a temporary file that the next writer (or ``gc``) removes, since holding the
  exclusive lock proves its writer is gone.
* **Hold**: every attached process holds a *shared* ``flock`` on the lock file. The kernel drops
  it when the process dies, SIGKILL included: there are no pid files to go stale.
* **Release** (``holds``): the last holder to leave unlinks the segment, unless it was published
  with keep warm; **sweep** (``inventory``, ``modelshare gc``) removes what crashes left.
* Lock files are only unlinked under their own exclusive lock, and whoever locks one checks
  afterwards that the path still names the file it locked (``locks``).

Example::

    name = SegmentName.for_model(directory, "resnet", version_hash)
    handle, published = open_or_publish(name, produce=lambda: Publication(fields, codec.encode(model), False))
    model = codec.decode(handle.mapping.skeleton, handle.mapping.buffers)
    ...
    release(handle)
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Callable, NamedTuple, Optional

from .._log import Log
from ..codecs import Encoded
from ..errors import AcquireTimeoutError
from .directory import SegmentName
from .file_pages import FilePages
from .format import try_map, write_segment
from .holds import SegmentHandle
from .locks import inode, lock_file, lock_holders, same_file
from .waiting import Deadline

_log = Log(__name__)

__all__ = ["open_or_publish", "Produce", "Publication"]


class Publication(NamedTuple):
    """What a loader hands over to publish: header fields, the encoded model, whether to keep it
    warm, and which buffers stay in their weights files (``file_pages``; None: copy them all)."""

    fields: dict[str, Any]
    encoded: Encoded
    keep_warm: bool
    file_pages: Optional[FilePages] = None


Produce = Callable[[], Publication]


def _timed_out(name: SegmentName, timeout: Optional[float]) -> AcquireTimeoutError:
    return AcquireTimeoutError(
        f"waited {timeout:g} s for the model at {name.directory / name.stem}; the process loading it is "
        "still at work (see `modelshare ls`). Raise timeout=, or kill a stuck loader: its lock is "
        "released when it dies")


def open_or_publish(
    name: SegmentName, produce: Produce, *, timeout: Optional[float] = None
) -> tuple[SegmentHandle, bool]:
    """Attach ``name``'s segment, publishing it first with ``produce()`` if nobody has.

    ``produce`` returns a :class:`Publication` and runs in at most one process
    at a time, under the exclusive lock. Returns the handle and whether this call published.
    Waits ``timeout`` seconds at most for another process's load (None: as long as it takes).
    """
    deadline = Deadline(timeout)
    while True:
        fd = lock_file(name.lock_path, fcntl.LOCK_SH, deadline, lambda: _timed_out(name, timeout),
                       on_wait=lambda seconds: _log.info("waiting for pid %s loading %r (%.0f s)",
                                                         _loader(name), name.key, seconds))
        assert fd is not None
        try:
            mapping = try_map(name.seg_path)
            if mapping is not None:
                return SegmentHandle(name, fd, mapping), False
            if not _lock_to_publish(fd, name, deadline, timeout) or not same_file(fd, name.lock_path):
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
            if same_file(fd, name.lock_path) and inode(name.seg_path) == mapping.inode:
                return SegmentHandle(name, fd, mapping), published
            mapping.close()
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise


def _loader(name: SegmentName) -> str:
    """Who holds ``name``'s lock while we wait for it: the process loading the model."""
    pids = lock_holders(name.lock_path)
    return ", ".join(map(str, pids)) if pids else "?"


def _lock_to_publish(fd: int, name: SegmentName, deadline: Deadline, timeout: Optional[float]) -> bool:
    """Trade our shared lock for the exclusive one, to publish; False if the segment appeared first.

    Never blocks on the exclusive lock: a process that published and attached holds its shared
    lock for as long as it uses the model, so a blocking wait could last forever. A failed
    non-blocking conversion leaves no lock at all (flock converts by unlocking first); the caller
    then starts over and attaches.
    """
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if name.seg_path.exists():
                return False
            if deadline.expired():
                raise _timed_out(name, timeout) from None
            deadline.sleep()


def _publish(name: SegmentName, produce: Produce) -> None:
    """Run ``produce`` and write its result; every reference to the model dies with this frame."""
    fields, encoded, keep_warm, file_pages = produce()
    write_segment(name.seg_path, name.temporary_path(), fields, encoded, keep_warm=keep_warm, file_pages=file_pages)


def _remove_temporaries(name: SegmentName) -> None:
    """Remove ``name``'s half-written files; only valid while holding its exclusive lock."""
    for path in name.temporaries():
        path.unlink(missing_ok=True)
