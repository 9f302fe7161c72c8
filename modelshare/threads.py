"""Intra-op threads for a model that N worker processes on one machine compute with.

Every framework sizes its thread pool to the machine's cores, per process: four worker processes
(Beam SDK workers, a process pool) on two cores run eight PyTorch threads (or eight ONNX Runtime
threads) that preempt each other. Once the weights are shared, the processes that hold them are
known -- they are the holders of the segment's lock -- so each one can take its share: cores ÷
holders, at least one.

PyTorch's pool (``torch.set_num_threads``) and the BLAS pools of numpy and scikit-learn
(``threadpoolctl``, which scikit-learn installs) are resized in place, re-checked at most every
``recheck_seconds`` as workers come and go. ONNX Runtime fixes its pool when a session is created,
so an ONNX session takes the share that holds at its creation.

    share = ThreadShare("auto")
    model = shared.acquire()
    share.apply(shared)  # before each call, or now and then: it re-checks the holders itself
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, Union

Threads = Union[int, str, None]


class ThreadShare:
    """``threads``: a fixed count, ``"auto"`` (cores ÷ processes holding the model), or None
    (leave the frameworks' defaults)."""

    def __init__(self, threads: Threads = "auto", recheck_seconds: float = 10.0) -> None:
        if not (threads is None or threads == "auto" or (isinstance(threads, int) and threads > 0)):
            raise ValueError(f"threads must be a positive int, 'auto' or None, not {threads!r}")
        self.threads = threads
        self.recheck_seconds = recheck_seconds
        self._next_check = 0.0
        self._applied: Optional[int] = None

    def count(self, shared: Any, *, joining: bool = False) -> Optional[int]:
        """The threads this process should use for ``shared``'s model now. ``joining``: this
        process does not hold the model yet and is about to (it counts as one more holder)."""
        if self.threads is None or isinstance(self.threads, int):
            return self.threads
        holders = len(shared.holders()) + (1 if joining else 0)
        return max(1, (os.cpu_count() or 1) // max(1, holders))

    def apply(self, shared: Any) -> None:
        """Resize the pools in use here (rate-limited): PyTorch's intra-op pool, and the BLAS
        pools numpy and scikit-learn compute with (through threadpoolctl, where installed)."""
        now = time.monotonic()
        if self.threads is None or now < self._next_check:
            return
        self._next_check = now + self.recheck_seconds
        wanted = self.count(shared)
        if wanted is None or wanted == self._applied:
            return
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(wanted)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            threadpool_limits(limits=wanted)  # stays in force: never restored
        self._applied = wanted
