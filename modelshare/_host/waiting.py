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
    """``seconds`` from now (None: never); ``sleep()`` waits 1 ms, then twice as long each time, up
    to ``longest`` seconds, never past the deadline."""

    def __init__(self, seconds: Optional[float], *, longest: float = 0.05) -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds
        self._delay = 0.001
        self._longest = longest

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def remaining(self) -> Optional[float]:
        """Seconds left (never negative), or None without a deadline."""
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def sleep(self) -> None:
        remaining = self.remaining()
        time.sleep(self._delay if remaining is None else min(self._delay, remaining))
        self._delay = min(self._delay * 2, self._longest)
