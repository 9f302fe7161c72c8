"""What the tests share: models, loaders and process entry points (``workers``, importable by
spawned children), PSS runs (``pss``), where the repository is (``ROOT``), and waiting for
owner processes to leave (``left_after``)."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: run subprocesses from here


def left_after(directory: Path, timeout: float = 30.0) -> list[str]:
    """Wait for ``directory`` to empty -- servers and keepers exit by themselves once idle and
    remove their files -- and return what is still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
