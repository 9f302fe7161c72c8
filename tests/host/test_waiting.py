"""The one way modelshare waits: how late a waiter can be, how often it tries, and its deadline --
on a clock the test drives (the schedule is the subject, not the machine's speed)."""

from __future__ import annotations

import pytest

from modelshare._host import waiting
from modelshare._host.waiting import Deadline


class _Clock:
    """``time.monotonic`` and ``time.sleep`` for ``waiting``: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(waiting, "time", fake)
    return fake


@pytest.mark.parametrize("event_at", [0.0005, 0.03, 0.2, 1.0, 7.5, 60.0])
def test_a_waiter_sees_an_event_at_most_5_percent_or_1_ms_late(clock: _Clock, event_at: float) -> None:
    deadline = Deadline(None)
    start = clock.now
    while clock.now - start < event_at:  # one try: has it happened?
        deadline.sleep()
    late = clock.now - start - event_at
    assert late <= max(0.001, 0.05 * event_at) + 1e-9, (event_at, late)


def test_a_long_wait_tries_twenty_times_a_second_and_a_short_one_a_few_dozen_times(clock: _Clock) -> None:
    deadline = Deadline(None)
    start = clock.now
    while clock.now - start < 1.0:
        deadline.sleep()
    assert len(clock.sleeps) <= 150, "a one-second wait"
    tries = len(clock.sleeps)
    while clock.now - start < 11.0:
        deadline.sleep()
    assert len(clock.sleeps) - tries == pytest.approx(200, abs=2), "ten more seconds at the longest sleep"


def test_no_sleep_runs_past_the_deadline(clock: _Clock) -> None:
    deadline = Deadline(0.3)
    start = clock.now
    while not deadline.expired():
        deadline.sleep()
    assert clock.now - start == pytest.approx(0.3)
    assert deadline.remaining() == 0.0
