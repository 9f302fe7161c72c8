"""Who routes through a directory: the last process to leave evicts the models routers kept warm.

A router keeps released models loaded (warm) until the budget needs their room; once no process
routes through the directory any more, nobody will use them, and they go. Every process using a
router there holds a shared ``flock`` on ``router.users`` for life -- one of its resources
(``_process``): a forked child takes a lock of its own, and at exit, after its models are
released, it lets go and tries the exclusive lock: if that succeeds it was the last user, and it
evicts what the routers kept warm. A SIGKILLed last user cannot; ``modelshare gc`` does it then.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from .. import _process
from .._host.directory import SegmentName
from .._host.inventory import evict
from .._host.locks import lock_file
from .._host.trust import open_own
from .ledger import Ledger

__all__ = ["USERS", "join", "sweep_router"]

USERS = "router.users"
_join_lock = threading.Lock()


class _Membership(_process.Resource):
    """This process's shared lock on a directory's ``router.users``."""

    exit_stage = 2  # after the models (stage 0) and what they left (stage 1): eviction needs them gone

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory, self.fd = directory, fd

    def after_fork_in_child(self) -> None:
        fd = open_own(self.directory / USERS, os.O_RDWR | os.O_CREAT)
        os.close(self.fd)  # the parent's lock survives: it has its own descriptor
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a last user is sweeping right now: this child joins again on its next use
            os.close(fd)
            _process.untrack(self)
            return
        self.fd = fd

    def release_at_exit(self) -> None:
        os.close(self.fd)
        sweep_router(self.directory)


def join(directory: Path) -> None:
    """Count this process among the directory's router users (for life; once per directory)."""
    with _join_lock:
        if any(m.directory == directory for m in _process.tracked(_Membership)):
            return
        fd = lock_file(directory / USERS, fcntl.LOCK_SH)  # waits while a last user is sweeping
        assert fd is not None
        _process.track(_Membership(directory, fd))


def sweep_router(directory: Path) -> list[Path]:
    """If no process uses a router in ``directory`` any more (a SIGKILLed last user included),
    evict the models routers kept warm there -- and, once none is left, the routers' own files;
    what was removed."""
    ledger = Ledger(directory)
    if not ledger.exists():
        return []
    try:
        fd = lock_file(directory / USERS, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # not there to be made, or not this uid's (UntrustedFileError)
        return []
    if fd is None:
        return []  # routers are in use: their models stay
    try:
        removed = []
        with ledger.locked() as state:
            for stem in list(state.models):
                name = SegmentName(directory, stem)
                if name.seg_path.exists() and evict(name):
                    removed.append(name.seg_path)
                if not name.seg_path.exists():
                    del state.models[stem]  # the routers are gone: their models' records go with them
            state.reservations.clear()
            models_left = bool(state.models)
        if not models_left:  # no router user (their lock is ours), nothing routed: the routers' files go too
            for path in (*ledger.files(), directory / USERS):
                if path.exists():
                    path.unlink()
                    removed.append(path)
        return removed
    finally:
        os.close(fd)
