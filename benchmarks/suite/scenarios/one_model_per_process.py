"""Scenario 1: a small model, one copy per process, shared by that process's threads.

Each worker process runs several inference threads. Loading per thread multiplies the model by
the threads; Beam's ``Shared`` and modelshare's ``share="threads"`` keep one copy per process,
loaded once even when the threads race for it. The default limit fits one copy per process
beside each bare worker (plus ``headroom``), and not one per thread.
"""

from . import Scenario, headroom


def _limit(model: int, processes: int, threads: int, bare: int) -> int:
    return processes * (bare + model) + headroom(processes * model)


SCENARIO = Scenario(
    number=1,
    title="a small model, one per process, shared by its threads",
    approaches=("private-per-thread", "beam-shared", "modelshare-threads"),
    threads=4,
    default_limit=_limit,
    must_survive=("beam-shared", "modelshare-threads"),
)
