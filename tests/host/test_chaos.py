"""SIGKILL at the worst moments: nobody else fails, nobody sees half a segment, nothing leaks."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from modelshare import SharedModel, gc_segments, list_segments

from ..support import ROOT, leftovers
from ..support import workers as _workers
from ..support.workers import loads_counted, make_mlp, sample_input


def _wait_for(predicate, timeout=120.0, interval=0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def test_sigkill_loader_mid_publish(shm_dir: Path, tmp_path: Path, spawn) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(make_mlp, 256, counter=counter), key="killed-loader")
    x = sample_input()
    results, done = spawn.Queue(), spawn.Event()

    loader_proc = spawn.Process(target=_workers.use_worker, args=(shared, x, results, done), daemon=True)
    loader_proc.start()
    _wait_for(lambda: loads_counted(counter))  # the first process is inside the loader, holding the lock
    waiter = spawn.Process(target=_workers.use_worker, args=(shared, x, results, done), daemon=True)
    waiter.start()

    seen = set()

    def writing():
        names = [p.name for p in shm_dir.iterdir()] if shm_dir.exists() else []
        seen.update(names)
        return any(".seg.tmp-" in n for n in names)

    _wait_for(writing)
    assert not shared.segment_name.seg_path.exists(), "a segment must not be visible before it is complete"
    os.kill(loader_proc.pid, signal.SIGKILL)
    loader_proc.join(30)
    assert loader_proc.exitcode == -signal.SIGKILL

    pid, out, _ = results.get(timeout=240)
    assert pid == waiter.pid
    np.testing.assert_array_equal(out, make_mlp(256)(x))
    assert loads_counted(counter) == [loader_proc.pid, waiter.pid]
    assert not any(".seg.tmp-" in p.name for p in shm_dir.iterdir()), "the killed writer's file must be gone"
    done.set()
    waiter.join(60)
    assert waiter.exitcode == 0
    assert leftovers(shm_dir) == []


def test_sigkill_attached_process_mid_use(shm_dir: Path, spawn) -> None:
    shared = SharedModel(functools.partial(make_mlp, 64, width=2048), key="killed-user")
    x = sample_input(2048)
    expected = make_mlp(64, width=2048)(x)
    results, done = spawn.Queue(), spawn.Event()
    victim = spawn.Process(target=_workers.hold_forever, args=(shared, x, results), daemon=True)
    survivor = spawn.Process(target=_workers.use_worker, args=(shared, x, results, done), daemon=True)
    victim.start()
    survivor.start()
    got = {pid: out for pid, out, _ in (results.get(timeout=120), results.get(timeout=120))}
    assert set(got) == {victim.pid, survivor.pid}
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)

    model = shared.acquire()  # this process attaches after the kill: same segment, same weights
    np.testing.assert_array_equal(model(x), expected)
    np.testing.assert_array_equal(got[survivor.pid], expected)
    shared.release(model)
    del model
    assert shared.segment_name.seg_path.exists(), "the survivor still holds the segment"
    done.set()
    survivor.join(60)
    assert survivor.exitcode == 0
    assert leftovers(shm_dir) == [], "the last holder to release must unlink the segment"


def _orphan(spawn, key: str, counter: str = "", before_the_kill: Callable[[SharedModel], None] = lambda _: None
            ) -> SharedModel:
    """A model whose only holder was SIGKILLed mid-use: its segment is left behind."""
    shared = SharedModel(functools.partial(make_mlp, 8, width=512, counter=counter or None), key=key)
    results = spawn.Queue()
    victim = spawn.Process(target=_workers.hold_forever, args=(shared, sample_input(512), results), daemon=True)
    victim.start()
    results.get(timeout=120)
    assert shared.holders() == [victim.pid]
    before_the_kill(shared)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    assert shared.segment_name.seg_path.exists()
    return shared


def test_sigkill_of_last_holder_leaves_an_orphan_that_gc_collects(shm_dir: Path, spawn) -> None:
    _orphan(spawn, "orphan")
    (orphan,) = list_segments(shm_dir)
    assert orphan.holders == [] and orphan.key == "orphan" and orphan.state == "orphaned"
    listed = subprocess.run([sys.executable, "-m", "modelshare", "ls"], capture_output=True, text=True,
                            env=dict(os.environ), timeout=60)
    assert "orphaned" in listed.stdout, listed.stdout
    out = subprocess.run([sys.executable, "-m", "modelshare", "gc"], capture_output=True, text=True,
                         env=dict(os.environ), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "removed 1 file" in out.stdout
    assert leftovers(shm_dir) == []


_NO_PROC_LOCKS = ("import modelshare._host.locks as locks; "
                  "locks.lock_table = lambda: (_ for _ in ()).throw(AssertionError('read /proc/locks')); ")


def _acquire_in_a_fresh_process(shared: SharedModel, prelude: str = "") -> subprocess.CompletedProcess:
    code = (prelude + "import sys, pickle, logging; logging.basicConfig(level=logging.INFO); "
            "from tests.support.workers import sample_input; m = pickle.loads(sys.stdin.buffer.read()); "
            "x = m.acquire(); print(float(x(sample_input(512)).sum()), m.hold_info().loaded_here); m.release(x)")
    import pickle

    return subprocess.run([sys.executable, "-c", code], input=pickle.dumps(shared), capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120, cwd=ROOT)


def test_the_next_acquire_adopts_an_orphan(shm_dir: Path, tmp_path: Path, spawn) -> None:
    """An orphan survives other models' first use of the directory, and the next acquire of its
    model attaches to it -- checked, not loaded again; then it is released as usual."""
    counter = str(tmp_path / "loads")
    shared = _orphan(spawn, "orphan-a", counter)
    other = SharedModel(functools.partial(make_mlp, 4, width=512), key="other")
    assert _acquire_in_a_fresh_process(other).returncode == 0  # its first use of the directory sweeps
    assert [s.key for s in list_segments(shm_dir)] == ["orphan-a"], "the orphan is kept for adoption"
    run = _acquire_in_a_fresh_process(shared)
    assert run.returncode == 0, run.stderr.decode()
    total, loaded_here = run.stdout.decode().split()
    assert loaded_here == "False" and float(total) == float(make_mlp(8, width=512)(sample_input(512)).sum())
    assert "adopting" in run.stderr.decode()
    assert len(loads_counted(counter)) == 1, "adopted, not loaded again"
    assert leftovers(shm_dir) == [], "released by its adopter as any segment"
    assert gc_segments(shm_dir) == []


def test_an_attach_tells_a_held_segment_from_an_orphan_without_reading_proc_locks(shm_dir: Path, tmp_path: Path,
                                                                                  spawn) -> None:
    """Whether anyone else holds the segment is asked of the lock itself (a shared lock converted to
    exclusive without waiting): reading ``/proc/locks`` waits out an RCU grace period, 8-16 ms of
    every attach. Attached while its holder lives: used as is; after the holder's SIGKILL: adopted."""
    counter = str(tmp_path / "loads")
    attaches = []
    shared = _orphan(spawn, "orphan-b", counter, lambda held: attaches.append(_acquire_in_a_fresh_process(
        held, _NO_PROC_LOCKS)))
    adopts = _acquire_in_a_fresh_process(shared, _NO_PROC_LOCKS)
    for run, adopting in ((attaches[0], False), (adopts, True)):
        assert run.returncode == 0, run.stderr.decode()
        total, loaded_here = run.stdout.decode().split()
        assert loaded_here == "False" and float(total) == float(make_mlp(8, width=512)(sample_input(512)).sum())
        assert ("adopting" in run.stderr.decode()) is adopting, run.stderr.decode()
    assert len(loads_counted(counter)) == 1
    assert leftovers(shm_dir) == [], "released by its adopter as any segment"


def test_a_damaged_orphan_is_replaced_not_used(shm_dir: Path, tmp_path: Path, spawn) -> None:
    counter = str(tmp_path / "loads")
    shared = _orphan(spawn, "damaged", counter)
    path = shared.segment_name.seg_path
    with open(path, "r+b") as f:  # a weight flipped after publishing (the segment is this uid's file)
        f.seek(path.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    run = _acquire_in_a_fresh_process(shared)
    assert run.returncode == 0, run.stderr.decode()
    total, loaded_here = run.stdout.decode().split()
    assert loaded_here == "True" and float(total) == float(make_mlp(8, width=512)(sample_input(512)).sum())
    assert "does not match its checksum" in run.stderr.decode() and "loading anew" in run.stderr.decode()
    assert len(loads_counted(counter)) == 2
    assert leftovers(shm_dir) == []
