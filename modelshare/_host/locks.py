"""``flock``s on files in the segment directory: who holds what, kept by the kernel.

A shared lock is a hold (every process using a segment has one); an exclusive lock is the right
to publish, unlink or start an owner. The kernel drops a process's locks when it dies, SIGKILL
included, so nothing here can go stale. Whoever locks a file checks afterwards that its path
still names the file it locked: a file unlinked and re-created meanwhile is locked anew, so two
processes never hold locks on two different files of the same name.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import UntrustedFileError
from .directory import directory_error
from .trust import open_own
from .waiting import Deadline

__all__ = ["same_file", "inode", "lock_file", "flock_until", "lock_table", "lock_holders", "LockTable"]


def inode(path: Path) -> Optional[tuple[int, int]]:
    """(device, inode) of ``path``, or None if there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` names the file open as ``fd`` now."""
    own = os.fstat(fd)
    return inode(path) == (own.st_dev, own.st_ino)


#: seconds between two ``on_wait`` calls of a lock wait (the "waiting for pid N" log line)
WAIT_REPORT_EVERY = 10.0


def flock_until(fd: int, op: int, deadline: Deadline, timed_out: Callable[[], BaseException],
                on_wait: Optional[Callable[[float], None]] = None) -> None:
    """``flock(fd, op)``, waiting until ``deadline`` at most; then ``raise timed_out()``.
    ``on_wait(seconds)`` is called every ``WAIT_REPORT_EVERY`` seconds of waiting."""
    if deadline.seconds is None and on_wait is None:
        fcntl.flock(fd, op)
        return
    start = next_report = time.monotonic()
    next_report += WAIT_REPORT_EVERY
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline.expired():
                raise timed_out() from None
            if on_wait is not None and time.monotonic() >= next_report:
                on_wait(time.monotonic() - start)
                next_report += WAIT_REPORT_EVERY
            deadline.sleep()


def lock_file(path: Path, op: int, deadline: Optional[Deadline] = None,
              timed_out: Optional[Callable[[], BaseException]] = None, *, create: bool = True,
              on_wait: Optional[Callable[[float], None]] = None) -> Optional[int]:
    """Open and ``flock`` ``path``; return the fd once the path still names the locked file.

    Returns None when ``create`` is false and the file does not exist, or when ``op`` includes
    ``LOCK_NB`` and the lock is taken. A blocking ``op`` waits until ``deadline`` (default: as long as
    it takes), then raises ``timed_out()``, calling ``on_wait(seconds)`` now and then meanwhile
    (``flock_until``). A path that is not this uid's regular file (a symlink, a FIFO, another
    user's file) raises :class:`UntrustedFileError`.
    """
    deadline = deadline or Deadline(None)
    while True:
        try:
            fd = open_own(path, os.O_RDWR | (os.O_CREAT if create else 0))
        except FileNotFoundError:
            return None
        except UntrustedFileError:
            raise
        except OSError as exc:
            raise directory_error(exc, path.parent) from exc
        try:
            if op & fcntl.LOCK_NB:
                fcntl.flock(fd, op)
            else:
                flock_until(fd, op, deadline, timed_out or (lambda: TimeoutError(f"waited for the lock on {path}")),
                            on_wait)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if same_file(fd, path):
            return fd
        os.close(fd)
        if not create:
            return None


LockTable = dict[tuple[int, int], list[int]]  # (device, inode) -> pids holding a flock on it


def lock_table() -> LockTable:
    """Every ``flock`` on the machine, from one read of ``/proc/locks`` (no bookkeeping of ours)."""
    try:
        with open("/proc/locks") as f:
            lines = f.readlines()
    except OSError:
        return {}
    table: dict[tuple[int, int], set[int]] = {}
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        major, minor, ino = parts[5].split(":")
        table.setdefault((os.makedev(int(major, 16), int(minor, 16)), int(ino)), set()).add(int(parts[4]))
    return {key: sorted(pids) for key, pids in table.items()}


def lock_holders(lock_path: Path, table: Optional[LockTable] = None) -> list[int]:
    """Pids holding a ``flock`` on ``lock_path`` (``table``: a :func:`lock_table` already read, for
    many lookups at the cost of one read)."""
    found = inode(lock_path)
    if found is None:
        return []
    return (lock_table() if table is None else table).get(found, [])
