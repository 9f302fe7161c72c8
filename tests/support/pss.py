"""The PSS check every codec must pass: N spawned processes pay for the weights once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from modelshare import memory

from . import workers as _workers
from .workers import MiB


@dataclass
class SharedRun:
    """What N processes that acquired one shared model returned and cost."""

    outputs: list[Any]
    total_pss: int
    in_segments: int
    bare_pss: int
    segment_bytes: int

    def report(self, weights: int) -> str:
        return (f"{len(self.outputs)} processes: {self.total_pss / MiB:.0f} MiB PSS ({self.in_segments / MiB:.0f} "
                f"MiB of it in the segment); budget {self.budget(weights) / MiB:.0f} MiB = 1.1 x (weights "
                f"{weights / MiB:.0f} MiB + {len(self.outputs)} bare processes {self.bare_pss / MiB:.0f} MiB)")

    def budget(self, weights: int) -> float:
        return (weights + self.bare_pss) * 1.10


def bare_pss(spawn: Any, framework: str, n: int) -> int:
    """Total PSS of ``n`` live processes that imported modelshare and ``framework``."""
    ready, done = spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=_workers.bare_framework_worker, args=(framework, ready, done), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    pids = [ready.get(timeout=240) for _ in procs]
    total = memory.total_pss(pids)
    done.set()
    for p in procs:
        p.join(60)
    return total


def run_shared(spawn: Any, shm_dir: Path, framework: str, worker: Callable[..., None], shared: Any, x: Any,
               n: int = 4) -> SharedRun:
    """Start ``n`` processes running ``worker(shared, x, results, done)``; measure while they hold."""
    baseline = bare_pss(spawn, framework, n)
    results, done = spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=worker, args=(shared, x, results, done), daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    pids = [pid for pid, _, _ in got]
    run = SharedRun(
        outputs=[out for _, out, _ in got],
        total_pss=memory.total_pss(pids),
        in_segments=sum(memory.process(pid, shm_dir).segment_pss for pid in pids),
        bare_pss=baseline,
        segment_bytes=memory.segment_bytes(shm_dir),
    )
    done.set()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return run
