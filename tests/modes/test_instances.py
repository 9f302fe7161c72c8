"""SharedModel.instance(): instances with their own state over one copy of the weights, held
until released or garbage (what Beam's RunInference asks for, one per transform)."""

from __future__ import annotations

import functools
import gc
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from modelshare import SharedModel

from ..support import eventually, leftovers
from ..support import workers as _workers
from ..support.pss import run_shared
from ..support.workers import MiB


@pytest.mark.parametrize("share", ["processes", "threads"])
def test_each_instance_has_its_own_state_over_the_same_weights(shm_dir: Path, share: str) -> None:
    shared = SharedModel(_workers.stateful, key=f"state-{share}", share=share)
    first, second = shared.instance(), shared.instance()
    assert first is not second
    assert [first(1.0) for _ in range(3)] == [2.0, 3.0, 4.0]
    assert [second(1.0) for _ in range(3)] == [2.0, 3.0, 4.0], "state leaked from one instance to another"
    assert np.shares_memory(first.weights, second.weights), "an instance copied the weights"
    if share == "processes":
        assert not first.weights.flags.writeable  # zero-copy views of the segment
    shared.release(first)
    shared.release(second)
    assert shared.hold_info() is None
    del first, second


def test_acquire_still_hands_out_one_object_beside_instances(shm_dir: Path) -> None:
    shared = SharedModel(_workers.stateful, key="mixed")
    held = shared.acquire()
    made = shared.instance()
    assert shared.acquire() is held and made is not held
    shared.release(held)
    shared.release(held)
    assert shared.hold_info() is not None, "the instance still holds the model"
    with pytest.raises(ValueError, match="did not hand out"):
        shared.release(held)  # one release more than acquires, though an instance is still out
    shared.release(made)
    with pytest.raises(ValueError, match="did not hand out"):
        shared.release(made)
    assert shared.hold_info() is None
    del held, made  # a released model still referenced still maps the segment
    assert eventually(lambda: not leftovers(shm_dir))


@pytest.mark.parametrize("share", ["processes", "threads"])
def test_an_instance_that_becomes_garbage_is_released(shm_dir: Path, share: str) -> None:
    shared = SharedModel(_workers.stateful, key=f"gc-{share}", share=share)
    model = shared.instance()
    assert shared.hold_info() is not None
    if share == "processes":
        assert len(list(shm_dir.glob("*.seg"))) == 1
    del model
    assert eventually(lambda: shared.hold_info() is None), "a collected instance was never released"
    assert eventually(lambda: not list(shm_dir.glob("*.seg"))), sorted(os.listdir(shm_dir))


def test_a_new_instance_whose_id_reuses_a_collected_one_stays_held(shm_dir: Path) -> None:
    shared = SharedModel(_workers.stateful, key="reuse")
    for _ in range(200):  # ids of dropped objects are reused at once: the reaper must not release the new one
        model = shared.instance()
        del model
    kept = shared.instance()
    time.sleep(0.2)
    gc.collect()
    assert shared.hold_info() is not None
    assert kept(1.0) == 2.0
    shared.release(kept)
    del kept
    assert eventually(lambda: shared.hold_info() is None)


def test_a_forked_child_releases_its_own_instances(shm_dir: Path) -> None:
    shared = SharedModel(_workers.stateful, key="forked")
    held = [shared.instance()]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child holds what the parent held, and drops it
        try:
            answered = held[0](1.0) == 2.0
            held.clear()
            released = eventually(lambda: shared.hold_info() is None, 20)
            os.write(write, pickle.dumps((answered, released)))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answered, released = pickle.loads(f.read())
    os.waitpid(pid, 0)
    assert answered and released, "the child's dropped instance was not released in the child"
    assert shared.hold_info() is not None and held[0](1.0) == 2.0, "the parent's instance is unaffected"
    assert len(list(shm_dir.glob("*.seg"))) == 1
    shared.release(held.pop())


def test_server_mode_has_no_instances_of_its_own(shm_dir: Path) -> None:
    shared = SharedModel(_workers.Unsplittable, key="srv", share="server")
    with pytest.raises(TypeError, match="server"):
        shared.instance()
    assert shared.hold_info() is None, "the failed instance() left a hold"
    assert eventually(lambda: not leftovers(shm_dir))


def test_processes_pay_for_the_weights_once_whatever_their_instances(shm_dir: Path, spawn) -> None:
    """Two processes, three instances each: one copy of the weights (PSS)."""
    shared = SharedModel(functools.partial(_workers.stateful, 256), key="many")
    run = run_shared(spawn, shm_dir, "numpy", _workers.instances_worker, shared, 1.0, 2)
    assert run.outputs == [[2.0, 2.0, 2.0]] * 2
    weights = 256 * MiB
    assert run.total_pss <= run.budget(weights), run.report(weights)


def test_threads_hand_the_loaded_model_to_the_first_taker(shm_dir: Path, tmp_path: Path) -> None:
    """One user costs one load; a model no codec can split is loaded once per further instance
    (as without modelshare), never once more for the hold itself."""
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(_workers.Unsplittable, counter=counter), key="once", share="threads")
    first = shared.instance()
    assert len(_workers.loads_counted(counter)) == 1
    second = shared.instance()
    held = shared.acquire()
    assert len({id(first), id(second), id(held)}) == 3
    assert len(_workers.loads_counted(counter)) == 3
    for model in (first, second, held):
        shared.release(model)
    assert shared.hold_info() is None


def test_threads_instances_start_from_the_loaded_state(shm_dir: Path) -> None:
    shared = SharedModel(_workers.stateful, key="pristine", share="threads")
    first = shared.instance()
    assert [first(1.0) for _ in range(3)] == [2.0, 3.0, 4.0]
    second = shared.instance()  # rebuilt from the model as loaded, not from the first instance's state
    assert second(1.0) == 2.0 and np.shares_memory(first.weights, second.weights)
    shared.release(first)
    shared.release(second)
