"""The admission policy as pure functions: no process, no file (``_router.admission``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelshare._router.admission import DEFAULT_LOAD_RATIO, Plan, fits, load_need, plan, size_estimate
from modelshare._router.ledger import ModelRecord

MiB = 1 << 20
PLENTY = 1 << 40


def test_size_estimate_prefers_what_was_measured_then_the_hint_then_relatives() -> None:
    records = {"a--1": ModelRecord("a", bytes=4 * MiB), "a--2": ModelRecord("a", bytes=6 * MiB),
               "b--1": ModelRecord("b", bytes=9 * MiB)}
    assert size_estimate(records, "a--1", "a", hint=1 * MiB) == 4 * MiB  # its own last load
    assert size_estimate(records, "a--3", "a", hint=1 * MiB) == 1 * MiB  # the caller's hint
    assert size_estimate(records, "a--3", "a", hint=None) == 6 * MiB  # the largest other version
    assert size_estimate(records, "c--1", "c", hint=None) == 9 * MiB  # the largest measured
    assert size_estimate({}, "c--1", "c", hint=None) is None  # nothing known: the load runs alone


def test_load_need_counts_the_loaders_copy() -> None:
    records = {"a--1": ModelRecord("a", bytes=4 * MiB, load_bytes=10 * MiB)}
    assert load_need(records, "a--1", 4 * MiB, load_overhead=1.0) == 4 * MiB  # a loader that maps its file
    assert load_need(records, "a--1", 4 * MiB, load_overhead=None) == 10 * MiB  # as its last load cost
    assert load_need(records, "b--1", 2 * MiB, load_overhead=None) == 5 * MiB  # the largest ratio seen (2.5)
    assert load_need({}, "b--1", 2 * MiB, load_overhead=None) == int(2 * MiB * DEFAULT_LOAD_RATIO)


def test_plan_evicts_least_recently_used_first_and_only_what_is_needed() -> None:
    held = {"old": 4 * MiB, "mid": 4 * MiB, "new": 4 * MiB}
    last_used = {"old": 1.0, "mid": 2.0, "new": 3.0}
    assert plan(4 * MiB, held, set(), last_used, budget=13 * MiB, available=PLENTY) == Plan(("old",), True)
    assert plan(5 * MiB, held, {"old"}, last_used, budget=13 * MiB, available=PLENTY) == Plan(("mid",), True)
    assert plan(8 * MiB, held, {"old"}, last_used, budget=13 * MiB, available=PLENTY) == Plan(("mid", "new"), True)
    assert plan(1 * MiB, held, set(), last_used, budget=13 * MiB, available=PLENTY) == Plan((), True)


def test_plan_evicts_nothing_for_a_load_that_cannot_fit_anyway() -> None:
    held = {"in-use": 8 * MiB, "idle": 4 * MiB}
    refused = plan(8 * MiB, held, {"in-use"}, {"idle": 0.0}, budget=13 * MiB, available=PLENTY)
    assert refused == Plan((), False), "evicting 'idle' would not make room: it stays warm"


def test_plan_makes_room_in_the_machines_memory_too() -> None:
    held = {"a": 4 * MiB}
    assert plan(6 * MiB, held, set(), {}, budget=None, available=3 * MiB) == Plan(("a",), True)
    assert plan(9 * MiB, held, set(), {}, budget=None, available=3 * MiB) == Plan((), False)


@given(sizes=st.lists(st.integers(1, 64), min_size=0, max_size=12), in_use=st.sets(st.integers(0, 11)),
       need=st.integers(0, 200), budget=st.one_of(st.none(), st.integers(0, 400)),
       available=st.integers(0, 400))
def test_a_plan_never_touches_a_model_in_use_and_its_answer_is_right(sizes: list[int], in_use: set[int], need: int,
                                                                     budget: object, available: int) -> None:
    held = {f"m{i}": size for i, size in enumerate(sizes)}
    busy = {f"m{i}" for i in in_use if i < len(sizes)}
    last_used = {f"m{i}": float((i * 7) % 5) for i in range(len(sizes))}
    result = plan(need, held, busy, last_used, budget, available)  # type: ignore[arg-type]
    assert not set(result.evict) & busy
    freed = sum(held[s] for s in result.evict)
    if result.fits:
        assert fits(sum(held.values()) - freed, need, available + freed, budget)  # type: ignore[arg-type]
        if result.evict:  # and no fewer evictions (of the least recently used) would have done
            last = result.evict[-1]
            assert not fits(sum(held.values()) - freed + held[last], need, available + freed - held[last],
                            budget)  # type: ignore[arg-type]
    else:
        idle = sum(size for stem, size in held.items() if stem not in busy)
        assert result.evict == () and not fits(sum(held.values()) - idle, need, available + idle,
                                               budget)  # type: ignore[arg-type]
