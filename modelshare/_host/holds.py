"""A process's hold on a segment, and giving it back.

A hold is a *shared* ``flock`` on the segment's lock file plus the mapping. Giving it back:

* The last holder to leave converts its lock to exclusive without blocking; if that succeeds
  nobody else holds the segment, and it unlinks the segment and the lock file (unless the
  segment was published with keep warm).
* While the model built on the segment is still referenced in this process (arrays, tensors on
  its pages), the mapping cannot close, and the hold *lingers* until the last such reference
  dies: a segment that is still mapped is never unlinked or evicted, and memory counted as free
  is free. A lingering hold is one of this process's resources (``_process``): a forked child
  takes a shared lock of its own, and at exit it is given back like any other.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Optional

from .. import _process
from ..errors import UntrustedFileError
from .directory import SegmentName
from .format import Mapping
from .locks import inode, lock_file, same_file

__all__ = ["SegmentHandle", "held_by_others", "release", "forget_lingering", "lingering_holds"]


class _HeldAcrossForks:
    """For holders of a shared lock (``lock_fd``) on ``name``'s lock file: how the hold crosses a
    fork (see ``_process``). The parent takes the child's lock just before the fork, on a
    descriptor of its own that only the child keeps; the child then locks once more under its own
    pid (what ``/proc/locks`` shows) and lets the prepared one go, so that at no moment is it
    without a lock of its own -- and no release by the parent can mistake itself for the last."""

    name: SegmentName
    lock_fd: int
    _child_fd = -1

    def before_fork(self) -> None:
        fd = lock_file(self.name.lock_path, fcntl.LOCK_SH | fcntl.LOCK_NB, create=False)
        self._child_fd = -1 if fd is None else fd  # (cannot be refused while this process holds it)

    def fork_done(self) -> None:
        if self._child_fd >= 0:
            os.close(self._child_fd)
            self._child_fd = -1

    def _lock_in_child(self, *, wait: bool) -> bool:
        """Hold on a lock of the child's own; False (nothing held) when ``wait`` is false and there
        is nothing left to lock. Without a prepared lock (a hold taken while the fork was under way)
        the lock is taken now, which cannot block: the parent's shared lock keeps exclusive ones out."""
        prepared, self._child_fd = self._child_fd, -1
        blocking = wait and prepared < 0
        fd = lock_file(self.name.lock_path, fcntl.LOCK_SH | (0 if blocking else fcntl.LOCK_NB), create=blocking)
        if prepared >= 0:
            os.close(prepared)
        if fd is None:
            return False
        os.close(self.lock_fd)  # the parent's lock survives: it has its own descriptor
        self.lock_fd = fd
        return True


@dataclass
class SegmentHandle(_HeldAcrossForks):
    """This process's hold on a segment: its shared lock and its mapping."""

    name: SegmentName
    lock_fd: int
    mapping: Mapping

    def after_fork_in_child(self) -> None:
        self._lock_in_child(wait=True)


def _give_up(name: SegmentName, lock_fd: int, keep_warm: bool) -> bool:
    """Close ``lock_fd``; unlink the segment if this was its last holder (unless kept warm).

    Two last holders letting go at once (workers that exit together) each see the other's shared
    lock and would both leave the segment to the other: whoever saw another holder looks once more
    after dropping its own lock, so one of them always unlinks it.
    """
    others = False
    try:
        if keep_warm:
            return False
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            others = True  # someone else holds it; our shared lock goes with the close below
        else:
            return _unlink_locked(name, lock_fd)
    finally:
        os.close(lock_fd)
    try:
        fd = lock_file(name.lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB, create=False) if others else None
    except (OSError, UntrustedFileError):
        return False  # the directory went away, or the name is not modelshare's now: nothing of ours to unlink
    if fd is None:
        return False  # still held (or gone already)
    try:
        return _unlink_locked(name, fd)
    finally:
        os.close(fd)


def _unlink_locked(name: SegmentName, lock_fd: int) -> bool:
    """Unlink ``name``'s segment and lock file, its lock held exclusively as ``lock_fd`` -- if the
    path still names that lock file; whether it did."""
    if not same_file(lock_fd, name.lock_path):
        return False
    name.seg_path.unlink(missing_ok=True)
    name.lock_path.unlink(missing_ok=True)
    return True


class _LingeringHold(_HeldAcrossForks, _process.Resource):
    """A hold given back by ``release()`` while something in this process still maps the segment."""

    exit_stage = 1

    def __init__(self, name: SegmentName, lock_fd: int, keep_warm: bool) -> None:
        self.name, self.lock_fd, self.keep_warm = name, lock_fd, keep_warm

    def drop(self) -> bool:
        """The mapping is gone: give the hold back (once); whether that unlinked the segment."""
        if self.lock_fd < 0:
            return False
        _process.untrack(self)
        lock_fd, self.lock_fd = self.lock_fd, -1
        return _give_up(self.name, lock_fd, self.keep_warm)

    def forget(self) -> None:
        """Give up the lock without unlinking anything on its account."""
        if self.lock_fd >= 0:
            _process.untrack(self)
            os.close(self.lock_fd)
            self.lock_fd = -1

    def after_fork_in_child(self) -> None:
        if not self._lock_in_child(wait=False):  # gone already: nothing to hold
            self.forget()

    def release_at_exit(self) -> None:
        self.drop()


def lingering_holds() -> list[_LingeringHold]:
    """This process's lingering holds (for tests and inspection)."""
    return _process.tracked(_LingeringHold)


def held_by_others(handle: SegmentHandle) -> Optional[bool]:
    """Whether another process holds ``handle``'s segment too; None if the segment went away meanwhile
    (the hold is stale: release it and start over).

    This process's shared lock converted to an exclusive one without waiting succeeds only when
    nobody else holds one (``/proc/locks`` tells as much, but reading it waits out an RCU grace
    period: 8-16 ms on every attach). flock drops the shared lock before it tries, so the lock is
    taken again and its names checked: a last holder letting go in that moment may have unlinked
    them (safe, as in ``_give_up``: this process then loads anew)."""
    try:
        fcntl.flock(handle.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        others = False
    except BlockingIOError:
        others = True
    fcntl.flock(handle.lock_fd, fcntl.LOCK_SH)  # blocks only behind an exclusive lock: a brief unlink or publish
    if not same_file(handle.lock_fd, handle.name.lock_path) or inode(handle.name.seg_path) != handle.mapping.inode:
        return None
    return others


def release(handle: SegmentHandle, *, keep_warm: Optional[bool] = None) -> bool:
    """Give up this process's hold; unlink the segment if it was the last holder, unless ``keep_warm``
    (by default the segment's flag; False for a version ``SharedModel.refresh()`` left behind).

    Returns whether the segment was removed. While the model built on it is still referenced, the
    hold lingers (see the module docstring).
    """
    keep_warm = handle.mapping.keep_warm if keep_warm is None else keep_warm
    if handle.mapping.close():
        return _give_up(handle.name, handle.lock_fd, keep_warm)
    hold = _LingeringHold(handle.name, handle.lock_fd, keep_warm)
    _process.track(hold)
    handle.mapping.when_unmapped(hold.drop)
    return False


def forget_lingering(name: SegmentName) -> None:
    """Give up this process's lingering holds on ``name`` (so that it can be evicted): for a caller
    whose own leftover references are about to die, e.g. a loop variable still bound to the
    previous model while the next one is admitted."""
    for hold in lingering_holds():
        if hold.name == name:
            hold.forget()
