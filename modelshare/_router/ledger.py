"""The router's ledger: what a segment directory cannot tell by itself, in one small file beside it.

What is held is read from the directory (segment sizes, kernel locks); the ledger keeps the rest,
per model version (by its stem): when it was last used, its size and what its last load cost
(the estimates before its next load), counters (loads, hits, evictions), and reservations of
loads in flight (which process, since when, how many bytes).

Every decision reads and writes it under one exclusive ``flock`` (``router.lock``): one decision
at a time across the machine. A write goes to ``router.ledger.tmp`` and is renamed over
``router.ledger``, so a process SIGKILLed mid-write leaves the previous ledger whole -- never a
torn or empty one. A ledger that is missing or cannot be read is rebuilt from the segments
themselves (each one's key, size and age); counters start again, nothing held is lost (holds are
kernel locks, not ledger entries).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .._host.inventory import list_segments
from .._host.trust import open_own, read_own

__all__ = ["LEDGER", "ModelRecord", "Reservation", "LedgerState", "Ledger"]

LEDGER = "router.ledger"
_LOCK = "router.lock"
MAX_LEDGER = 256 << 20  # far above 10,000 models' records


@dataclass
class ModelRecord:
    """One model version as the routers have seen it, machine-wide."""

    key: str
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    bytes: int = 0  # its segment's size, from its last load (0: not measured yet)
    last_used: float = 0.0
    load_bytes: int = 0  # what its last load cost: the segment plus the loader's own memory meanwhile


@dataclass
class Reservation:
    """Room set aside for a load in flight, for as long as the loading process runs."""

    pid: int
    started: float  # the process's start time: a reused pid is not the same process
    bytes: int

    @classmethod
    def here(cls, nbytes: int) -> "Reservation":
        """A reservation by this process."""
        return cls(os.getpid(), _start_time(os.getpid()), nbytes)

    def alive(self) -> bool:
        """Whether the process that made it still runs: the same process (not a reused pid), and
        not a zombie -- an exited worker its parent has not reaped yet holds no load."""
        import psutil  # here: not a cost of importing modelshare

        try:
            process = psutil.Process(self.pid)
            return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - self.started) < 1.0
        except psutil.Error:
            return False


def _start_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


@dataclass
class LedgerState:
    """The whole ledger: records and reservations by stem (``<key>--<version hash>``)."""

    models: dict[str, ModelRecord] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def record(self, stem: str, key: str) -> ModelRecord:
        """The record of ``stem``, made on first use."""
        return self.models.setdefault(stem, ModelRecord(key))

    def live_reservations(self) -> dict[str, Reservation]:
        """Reservations whose process still runs; the others are dropped (their load died with it)."""
        for stem in [s for s, r in self.reservations.items() if not r.alive()]:
            del self.reservations[stem]
        return self.reservations

    @classmethod
    def from_json(cls, data: bytes) -> Optional["LedgerState"]:
        """The state written as ``data``, or None if it cannot be read."""
        try:
            raw: Any = json.loads(data)
            return cls({stem: ModelRecord(**fields) for stem, fields in raw.get("models", {}).items()},
                       {stem: Reservation(**fields) for stem, fields in raw.get("reservations", {}).items()})
        except (ValueError, TypeError, AttributeError):
            return None

    @classmethod
    def from_segments(cls, directory: Path) -> "LedgerState":
        """What the segments in ``directory`` say: each model version's key, size and age."""
        return cls({info.stem: ModelRecord(info.key, bytes=info.nbytes, last_used=info.created)
                    for info in list_segments(directory) if info.state == "ready"})

    def to_json(self) -> bytes:
        return json.dumps({"models": {s: vars(r) for s, r in self.models.items()},  # (asdict is 4x slower)
                           "reservations": {s: vars(r) for s, r in self.reservations.items()}}).encode()


class Ledger:
    """The ledger of the routers in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LEDGER
        self._lock_path = directory / _LOCK

    def exists(self) -> bool:
        return self.path.exists()

    def files(self) -> tuple[Path, ...]:
        """The ledger's files (for the last router user's clean-up, its lock held)."""
        return (self.path, self.path.with_name(LEDGER + ".tmp"), self._lock_path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[LedgerState]:
        """The state, under the ledger's exclusive lock; written back when the block completes."""
        with self._locked():
            state = self._read()
            yield state
            self._write(state)

    def read(self) -> LedgerState:
        """The state now (a consistent copy; nothing is written)."""
        with self._locked():
            return self._read()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = open_own(self._lock_path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> LedgerState:
        try:
            state = LedgerState.from_json(read_own(self.path, MAX_LEDGER))
        except FileNotFoundError:
            state = None
        return state if state is not None else LedgerState.from_segments(self.path.parent)

    def _write(self, state: LedgerState) -> None:
        temporary = self.path.with_name(LEDGER + ".tmp")  # one writer at a time: the lock is held
        fd = open_own(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            data = state.to_json()
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
