"""What the benchmarks sample while a run goes on: the total PSS of process trees, and the peak of
any reading taken in the background."""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import psutil


def tree_pss(pids: Iterable[int]) -> int:
    """Total PSS of ``pids`` and all their descendants, each process once (ones that exit meanwhile
    are skipped)."""
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                procs[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    total = 0
    for proc in procs.values():
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class Peak:
    """``with Peak(read) as peak:`` -- ``peak.value`` is the largest ``read()`` seen every ``every`` seconds."""

    def __init__(self, read: Callable[[], int], every: float = 0.1) -> None:
        self.read, self.every, self.value = read, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.value = max(self.value, self.read())
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
