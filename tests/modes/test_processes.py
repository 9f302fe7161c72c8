"""share="processes" across real spawned processes: one load, one copy, PSS asserted."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

from modelshare import SharedModel

from ..support import leftovers
from ..support import workers as _workers
from ..support.pss import run_shared
from ..support.workers import MiB, loads_counted, make_mlp, sample_input

N_PROCS = 4


def _start(spawn, target, args, n):
    procs = [spawn.Process(target=target, args=args, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    return procs


def _collect(results, n, timeout=240):
    return [results.get(timeout=timeout) for _ in range(n)]


def _stop(procs, done):
    done.set()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_four_processes_pay_for_the_weights_once(shm_dir: Path, tmp_path: Path, spawn) -> None:
    counter = str(tmp_path / "loads")
    x = sample_input()
    expected = make_mlp(512)(x)
    shared = SharedModel(functools.partial(make_mlp, 512, counter=counter), key="mlp512", share="processes")
    run = run_shared(spawn, shm_dir, "numpy", _workers.use_worker, shared, x, N_PROCS)
    for out in run.outputs:
        np.testing.assert_array_equal(out, expected)
    weights = 512 * MiB
    print(run.report(weights))
    assert len(loads_counted(counter)) == 1
    assert run.segment_bytes >= weights
    assert run.total_pss <= run.budget(weights), run.report(weights)
    assert run.in_segments == pytest.approx(weights, rel=0.02), run.report(weights)
    assert leftovers(shm_dir) == []


def test_threads_in_processes_race_to_one_load(shm_dir: Path, tmp_path: Path, spawn) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(make_mlp, 16, width=1024, counter=counter, delay=0.5),
                         key="race", share="processes")
    x = sample_input(1024)
    results, done = spawn.Queue(), spawn.Event()
    procs = _start(spawn, _workers.use_worker, (shared, x, results, done, 8), N_PROCS)
    got = _collect(results, N_PROCS)
    _stop(procs, done)
    assert len(loads_counted(counter)) == 1
    assert all(same for _, _, same in got), "threads of one process must share one object"
    for _, out, _ in got[1:]:
        np.testing.assert_array_equal(out, got[0][1])


def test_lambda_loader_travels_by_value(shm_dir: Path, spawn) -> None:
    scale = np.float32(3.0)
    weight = np.eye(256, dtype=np.float32)
    shared = SharedModel(lambda: _workers.NumpyMLP([(weight * scale, np.zeros(256, np.float32))]), key="lam")
    x = sample_input(256)
    results, done = spawn.Queue(), spawn.Event()
    procs = _start(spawn, _workers.use_worker, (shared, x, results, done), 2)
    got = _collect(results, 2)
    _stop(procs, done)
    expected = _workers.NumpyMLP([(weight * scale, np.zeros(256, np.float32))])(x)
    for _, out, _ in got:
        np.testing.assert_array_equal(out, expected)


def test_exit_without_release_unlinks_the_segment(shm_dir: Path, spawn) -> None:
    shared = SharedModel(functools.partial(make_mlp, 4, width=512), key="forgot")
    results = spawn.Queue()
    (proc,) = _start(spawn, _workers.acquire_and_exit, (shared, results), 1)
    results.get(timeout=120)
    proc.join(60)
    assert proc.exitcode == 0
    assert leftovers(shm_dir) == []


def test_forked_child_holds_its_own_lock(shm_dir: Path) -> None:
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    shared = SharedModel(functools.partial(make_mlp, 4, width=512), key="forked")
    model = shared.acquire()
    results = fork.Queue()
    child = fork.Process(target=_workers.acquire_and_exit, args=(shared, results))
    child.start()
    assert results.get(timeout=60) == child.pid
    child.join(60)
    assert child.exitcode == 0
    assert shared.segment_name.seg_path.exists(), "the child's exit must not release the parent's hold"
    np.testing.assert_array_equal(model(sample_input(512)), make_mlp(4, width=512)(sample_input(512)))
    shared.release(model)
    del model
    assert leftovers(shm_dir) == []


def test_a_released_model_still_referenced_keeps_its_hold_until_it_dies(shm_dir: Path) -> None:
    from modelshare._host.inventory import evict

    shared = SharedModel(lambda: {"w": np.ones(50_000)}, key="linger")
    model = shared.acquire()
    shared.release(model)
    assert shared.holders() == [os.getpid()], "still mapped here: still held"
    assert not evict(shared.segment_name), "so nothing evicts it from under the model"
    assert model["w"].sum() == 50_000
    del model
    assert leftovers(shm_dir) == [], "the last reference gone: unmapped, and unlinked by its last holder"


def test_a_forked_child_cannot_give_up_its_parents_lingering_hold(shm_dir: Path) -> None:
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    shared = SharedModel(lambda: {"w": np.ones(50_000)}, key="linger-fork")
    model = shared.acquire()
    shared.release(model)
    results = fork.Queue()
    child = fork.Process(target=_workers.drop_lingering_holds, args=(results,))
    child.start()
    assert results.get(timeout=60) == [False], "the child held a lock of its own, not the parent's"
    child.join(60)
    assert shared.segment_name.seg_path.exists() and shared.holders() == [os.getpid()]
    del model
    assert leftovers(shm_dir) == []


def test_changed_loader_does_not_attach_to_stale_segment(shm_dir: Path) -> None:
    old = SharedModel(lambda: np.zeros(2048), key="versioned")
    new = SharedModel(lambda: np.ones(2048), key="versioned")
    pinned_a = SharedModel(lambda: np.zeros(2048), key="versioned", version="7")
    pinned_b = SharedModel(lambda: np.ones(2048), key="versioned", version="7")
    assert old.version_hash != new.version_hash
    assert pinned_a.version_hash == pinned_b.version_hash
    a = old.acquire()
    b = new.acquire()
    assert a.sum() == 0 and b.sum() == 2048
    old.release(a)
    new.release(b)


def test_a_waiter_that_locked_before_the_publish_attaches_instead_of_waiting_forever(shm_dir: Path, spawn) -> None:
    # The race a benchmark hit: B takes its shared lock and finds no segment; A and B both ask
    # for the exclusive lock (flock drops the shared one to convert); A wins, publishes and keeps
    # its shared lock for as long as it uses the model. An exclusive lock that B waited for
    # blockingly would never come: B must notice the segment and attach.
    from modelshare._host.segments import _lock_to_publish
    from modelshare._host.waiting import Deadline

    shared = SharedModel(functools.partial(make_mlp, 4, width=512), key="race")
    name = shared.segment_name
    results = spawn.Queue()
    (holder,) = _start(spawn, _workers.hold_forever, (shared, sample_input(512), results), 1)
    try:
        results.get(timeout=120)  # A published and holds it
        fd = os.open(name.lock_path, os.O_RDWR)  # B, its shared lock given up to convert
        try:
            assert not _lock_to_publish(fd, name, Deadline(None), None)  # returns: the segment is there
        finally:
            os.close(fd)
        with shared.use() as model:  # and B attaches to A's segment
            assert shared.hold_info() is not None and not shared.hold_info().loaded_here
            np.testing.assert_array_equal(model(sample_input(512)), make_mlp(4, width=512)(sample_input(512)))
    finally:
        holder.kill()
        holder.join(60)
    shared.release(shared.acquire())  # A is gone: this hold is the last, and collects the segment
