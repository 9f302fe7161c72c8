"""Admission: may a model load now, how much room does its load need, and what goes to make room.

Pure functions of what the router knows -- the ledger's records, the sizes held in the directory,
which of them are in use, the budget and the machine's available memory -- so the policy can be
read, and tested, without a process or a file:

* :func:`size_estimate`: the bytes a model's segment will take: as its last load measured, else
  the caller's hint, else the largest size measured for another version of its key, else the
  largest measured at all; None before anything was measured.
* :func:`load_need`: the bytes to reserve while it loads: the segment plus the loader's own copy
  beside it (``load_overhead`` times the size if given; else what its last load cost; else the
  size times the largest cost ratio measured here, 2 before any).
* :func:`plan`: which models to evict, least recently used first and never one in use, so that
  the load fits both the budget and the available memory -- or that it cannot fit now (then
  nothing is evicted: warm models are not thrown away for a load that waits anyway; a load of
  unknown size takes all the room there is instead).

Estimates only decide when a load may start. The bound itself is enforced with the exact size:
once a model is loaded and encoded, its segment's size is known before a byte is written, and
the router admits it again with that size (``ModelRouter._admit_publish``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional

from .ledger import ModelRecord

__all__ = ["size_estimate", "load_need", "Plan", "plan", "fits"]

DEFAULT_LOAD_RATIO = 2.0  # a loader that builds the model privately beside the segment it writes


def size_estimate(records: Mapping[str, ModelRecord], stem: str, key: str, hint: Optional[int]) -> Optional[int]:
    """The bytes ``stem``'s segment will take, as well as is known (see the module docstring)."""
    own = records.get(stem)
    if own is not None and own.bytes:
        return own.bytes
    if hint is not None:
        return hint
    same_key = [r.bytes for r in records.values() if r.key == key and r.bytes]
    if same_key:
        return max(same_key)  # another version of this model
    known = [r.bytes for r in records.values() if r.bytes]
    return max(known) if known else None


def load_need(records: Mapping[str, ModelRecord], stem: str, size: int, load_overhead: Optional[float]) -> int:
    """The bytes to reserve while ``stem`` (``size`` bytes when published) loads."""
    if load_overhead is not None:
        return int(size * load_overhead)
    own = records.get(stem)
    if own is not None and own.load_bytes:
        return own.load_bytes
    ratios = [r.load_bytes / r.bytes for r in records.values() if r.load_bytes and r.bytes]
    return int(size * (max(ratios) if ratios else DEFAULT_LOAD_RATIO))


def fits(held: int, need: int, available: int, budget: Optional[int]) -> bool:
    """Whether ``need`` more bytes fit beside ``held`` under ``budget`` and in ``available`` memory."""
    return (budget is None or held + need <= budget) and need <= available


@dataclass(frozen=True)
class Plan:
    """What to evict (least recently used first), and whether the load fits once they are gone."""

    evict: tuple[str, ...]
    fits: bool


def plan(need: int, held: Mapping[str, int], in_use: Collection[str], last_used: Mapping[str, float],
         budget: Optional[int], available: int, *, best_effort: bool = False) -> Plan:
    """Make room for ``need`` bytes: ``held`` is bytes by stem (what counts against the budget),
    ``in_use`` the stems no one may evict, ``available`` the machine's available memory.
    ``best_effort``: when it cannot fit, evict every idle model anyway (a load of unknown size
    takes all the room there is; its exact size is checked before it is written)."""
    total, free, chosen = sum(held.values()), available, []
    candidates = sorted((stem for stem in held if stem not in in_use),
                        key=lambda stem: (last_used.get(stem, 0.0), stem))
    for stem in candidates:
        if fits(total, need, free, budget):
            break
        chosen.append(stem)
        total -= held[stem]
        free += held[stem]
    if not fits(total, need, free, budget):
        return Plan(tuple(chosen) if best_effort else (), False)
    return Plan(tuple(chosen), True)
