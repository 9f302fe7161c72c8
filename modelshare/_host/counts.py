"""Machine-wide counts of what happened to each key's models: loads, attaches, evictions.

What a directory holds now (segments, holders) is read from the directory and the kernel; what
happened over time is not, so every process adds its events to one small file beside the
segments, ``modelshare.counts`` (JSON, under an exclusive ``flock``), and ``modelshare top`` and
the Prometheus collector (``modelshare.metrics``) read it. The counts outlive the segments (a
counter that fell back whenever the machine went idle would lie); a process SIGKILLed in the
middle of a write leaves a file that cannot be read, and the counts start again from zero, which
Prometheus reads as a counter reset. Recording never fails what it counts: a file that cannot be
written (a full disk, a file planted by someone else) is skipped with a warning logged once, and
a directory that is not modelshare's alone (a project folder) gets no counts file at all.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Optional

from .._log import Log
from ..errors import UntrustedFileError
from .directory import COUNTS_FILE
from .trust import foreign_names, open_own

__all__ = ["EVENTS", "add", "read", "set_budget"]

EVENTS = ("loads", "attaches", "evictions")
_MAX_BYTES = 64 << 20  # far above 100,000 keys' counts
_log = Log("modelshare")
_warned: set[Path] = set()


def add(directory: Path, key: str, event: str) -> None:
    """Count one ``event`` (``"loads"``, ``"attaches"`` or ``"evictions"``) of model ``key``."""
    assert event in EVENTS, event

    def count(state: dict[str, Any]) -> None:
        per_key = state["keys"].setdefault(key, {})
        per_key[event] = per_key.get(event, 0) + 1

    _update(directory, count)


def set_budget(directory: Path, budgets: dict[str, int]) -> None:
    """Record the byte budgets a router declares (``"host"``, ``"cuda:N"``): the latest one wins."""
    def record(state: dict[str, Any]) -> None:
        state["budgets"].update(budgets)

    _update(directory, record)


def read(directory: Path) -> dict[str, Any]:
    """``{"keys": {key: {event: n}}, "budgets": {memory: bytes}}``; empty if nothing was counted."""
    try:
        fd = open_own(directory / COUNTS_FILE, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, UntrustedFileError):
        return _empty()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _parse(os.pread(fd, _MAX_BYTES, 0))
    finally:
        os.close(fd)


def _empty() -> dict[str, Any]:
    return {"keys": {}, "budgets": {}}


def _parse(data: bytes) -> dict[str, Any]:
    """The counts written as ``data``; empty where they cannot be read (a write cut short)."""
    try:
        state = json.loads(data)
        if isinstance(state, dict) and isinstance(state.get("keys"), dict) and isinstance(state.get("budgets"), dict):
            return state
    except ValueError:
        pass
    return _empty()


def _open_to_count(path: Path) -> Optional[int]:
    """The counts file, open to read and write; made if missing -- unless the directory holds files
    modelshare did not make (a project folder given as ``$MODELSHARE_DIR``): nothing of ours is left
    lying in someone else's folder, so nothing is counted there."""
    try:
        return open_own(path, os.O_RDWR)
    except FileNotFoundError:
        if foreign_names(path.parent):
            return None
        return open_own(path, os.O_RDWR | os.O_CREAT)


def _update(directory: Path, change: Any) -> None:
    path = directory / COUNTS_FILE
    fd: Optional[int] = None
    try:
        fd = _open_to_count(path)
        if fd is None:
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = _parse(os.pread(fd, _MAX_BYTES, 0))
        change(state)
        data = json.dumps(state, separators=(",", ":")).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except (OSError, UntrustedFileError) as exc:
        if path not in _warned:
            _warned.add(path)
            _log.warning("cannot count in %s (%s); loads, attaches and evictions are not counted there", path,
                         str(exc))  # not the exception: its traceback would keep the caller's frame, and its model
    finally:
        if fd is not None:
            os.close(fd)
