"""What the tests share: models, loaders and process entry points (``workers``, importable by
spawned children), PSS runs (``pss``), where the repository is (``ROOT``), what a test left in a
directory (``leftovers``), and waiting for owner processes to leave (``left_after``) or for
anything else to come true (``eventually``)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Callable

from modelshare._host.directory import COUNTS_FILE

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: run subprocesses from here


def leftovers(directory: Path) -> list[str]:
    """What is in ``directory`` but the counts of loads and attaches (which outlive every segment)."""
    return sorted(p.name for p in directory.iterdir() if p.name != COUNTS_FILE) if directory.exists() else []


def left_after(directory: Path, timeout: float = 30.0) -> list[str]:
    """Wait for ``directory`` to empty -- servers and keepers exit by themselves once idle and
    remove their files -- and return what is still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(directory)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``condition()`` comes true within ``timeout`` seconds (collecting garbage between
    tries: instances dropped by their users are released by modelshare's reaper thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.02)
    return True
