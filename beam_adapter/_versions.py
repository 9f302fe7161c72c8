"""Model updates without reloads: each worker keeps the versions it has just moved on from.

Beam's side-input model updates (``model_metadata_pcoll``) are per window, and windows do not run
in order: a worker that has moved from version A to B meets a window whose side input is still A.
Beam reloads A then (and after a timed-out batch, or in the other worker). Here, when a worker
moves to a new version it keeps a hold on the one it leaves, so the segment stays on the machine
and a return to it -- in this worker or another -- attaches in milliseconds instead of loading
again: loads equal versions per machine. A kept version is let go once ``MAX_KEPT`` newer versions
have replaced it or it has gone ``keep_for`` seconds without being current (checked whenever the
handler loads or runs a batch), and by ``release_all``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from modelshare import SharedModel

__all__ = ["MAX_KEPT", "note_current", "prune", "release_all"]

#: previous versions a worker keeps per model at most (with the current one: MAX_KEPT + 1 on the machine)
MAX_KEPT = 2


@dataclass
class _Kept:
    shared: SharedModel[Any]
    model: Any  # from shared.acquire(): the hold that keeps the segment
    until: float  # time.monotonic() after which it is let go


_current: dict[tuple[str, str], SharedModel[Any]] = {}
_kept: dict[tuple[str, str], "OrderedDict[str, _Kept]"] = {}
_lock = threading.Lock()


def note_current(shared: SharedModel[Any], keep_for: float) -> None:
    """``shared`` is the version this process now runs; keep the one it replaces (if this process
    still holds it) for ``keep_for`` seconds, at most ``MAX_KEPT`` of them (0: keep none)."""
    slot = (str(shared.directory), shared.key)
    let_go: list[_Kept] = []
    with _lock:
        previous = _current.get(slot)
        _current[slot] = shared
        kept = _kept.setdefault(slot, OrderedDict())
        back = kept.pop(shared.version_hash, None)  # current again: the instance Beam holds keeps it now
        if back is not None:
            let_go.append(back)
        moved_on = previous is not None and previous.version_hash != shared.version_hash
        if moved_on and keep_for > 0 and previous.hold_info() is not None:  # never load just to keep
            kept[previous.version_hash] = _Kept(previous, previous.acquire(), time.monotonic() + keep_for)
        while len(kept) > MAX_KEPT:
            let_go.append(kept.popitem(last=False)[1])
    _release(let_go)
    prune()


def prune() -> None:
    """Let go of kept versions whose time is up."""
    now = time.monotonic()
    let_go: list[_Kept] = []
    with _lock:
        for kept in _kept.values():
            for version in [v for v, k in kept.items() if now >= k.until]:
                let_go.append(kept.pop(version))
    _release(let_go)


def release_all() -> None:
    """Let go of every kept version (the adapter's ``release_all``)."""
    with _lock:
        let_go = [k for kept in _kept.values() for k in kept.values()]
        _kept.clear()
        _current.clear()
    _release(let_go)


def _release(kept: list[_Kept]) -> None:
    for item in kept:
        with contextlib.suppress(ValueError):  # already given back
            item.shared.release(item.model)
