"""Scenario 4: an exact number of model instances per machine, whatever the number of workers.

Some models must not be shared by every worker at once (not thread-safe, native state, a GPU
engine): a user wants N instances on the machine -- Beam's ``model_copies=N``, which starts N
``MultiProcessShared`` servers inside the first workers and sends calls round robin over
sockets; modelshare's ``share="server", copies=N`` runs N server processes and sends each call to
the least busy one, arrays through shared memory. Beam's default (a copy per worker) is the
usual approach that runs out of memory. The default limit fits the bare workers and N copies,
each with the cost of a bare process beside it (a modelshare copy is a process of its own; Beam's
are threads of workers), plus ``headroom``.
"""

from . import Scenario, headroom

COPIES = 2


def _limit(model: int, processes: int, threads: int, bare: int) -> int:
    return processes * bare + COPIES * (model + bare) + headroom(COPIES * model)


SCENARIO = Scenario(
    number=4,
    title=f"exactly {COPIES} model instances for all the processes",
    approaches=("beam-shared", "beam-model-copies", "modelshare-server"),
    threads=1,
    default_limit=_limit,
    must_survive=("modelshare-server",),
    copies=COPIES,
)
