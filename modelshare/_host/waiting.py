"""One way to wait: a deadline, and sleeps that back off between tries.

Every wait in modelshare -- for another process's load, for a server to start, for a GPU copy's
keeper, for room in a budget -- is a loop of "try, else sleep a little longer, until the deadline".
``timeout=None`` means the same everywhere: no deadline, wait as long as it takes.

Example::

    deadline = Deadline(timeout)
    while not try_once():
        if deadline.expired():
            raise AcquireTimeoutError(...)
        deadline.sleep()
"""

from __future__ import annotations

import time
from typing import Optional

__all__ = ["Deadline"]


class Deadline:
    """``seconds`` from now (None: never). ``sleep()`` sleeps a twentieth of the time waited so far
    (1 ms at least, ``longest`` seconds at most, never past the deadline): what a waiter is waiting
    for is seen at most 5% (or 1 ms) after it happens, at a few dozen tries for a wait of a second
    and ``1 / longest`` a second after that."""

    LATENESS = 0.05  # of the time waited so far

    def __init__(self, seconds: Optional[float], *, longest: float = 0.05) -> None:
        self.seconds = seconds
        self._start = time.monotonic()
        self._end = None if seconds is None else self._start + seconds
        self._longest = longest

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def remaining(self) -> Optional[float]:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def sleep(self) -> None:
        now = time.monotonic()
        delay = min(max(0.001, (now - self._start) * self.LATENESS), self._longest)
        time.sleep(delay if self._end is None else max(0.0, min(delay, self._end - now)))
