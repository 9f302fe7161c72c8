"""Scenario 2: several models trained differently do the same task, picked by key.

Every call needs the model for its key (6 keys, the same sequence for every approach). Beam
bounds keyed models by count per worker (``KeyedModelHandler(max_models_per_worker_hint=2)``):
each worker keeps up to 2 private copies, 4 workers 8. modelshare's ``ModelRouter`` holds the
models once per machine under a byte budget for 2 of them, evicting the least recently used model
no worker is using (and making a call wait while the budget is taken by models in use). The
default limit fits the bare workers and 2 models (plus ``headroom``).
"""

from . import Scenario, headroom

KEYED_MODELS, HELD_MODELS = 6, 2


def _limit(model: int, processes: int, threads: int, bare: int) -> int:
    return processes * bare + HELD_MODELS * model + headroom(HELD_MODELS * model)


SCENARIO = Scenario(
    number=2,
    title=f"{KEYED_MODELS} keyed models, room for {HELD_MODELS}",
    approaches=("beam-keyed-hint", "modelshare-router"),
    threads=1,
    default_limit=_limit,
    must_survive=("modelshare-router",),
    keyed_models=KEYED_MODELS,
    held_models=HELD_MODELS,
)
