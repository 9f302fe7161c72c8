"""share="threads" and in-process behaviour: one instance per process, loaded once under a race."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelshare import SharedModel

from ..support import leftovers


class _CountingLoader:
    def __init__(self, delay: float = 0.2) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self) -> dict:
        self.calls += 1
        time.sleep(self.delay)  # widen the race window
        return {"w": np.arange(10_000.0)}


@pytest.mark.parametrize("share", ["threads", "processes"])
def test_racing_threads_load_once(shm_dir: Path, share: str) -> None:
    loader = _CountingLoader()
    shared = SharedModel(loader, key=f"race-{share}", share=share)
    barrier = threading.Barrier(16)
    got = []

    def run() -> None:
        barrier.wait()
        got.append(shared.acquire())

    threads = [threading.Thread(target=run) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == 1
    assert all(m is got[0] for m in got)
    for m in got:
        shared.release(m)


def test_threads_share_nothing_on_disk_and_reload_after_last_release(shm_dir: Path) -> None:
    loader = _CountingLoader(0)
    shared = SharedModel(loader, key="t", share="threads")
    with shared.use() as a:
        with shared.use() as b:
            assert a is b
    assert not shm_dir.exists()
    with shared.use():
        pass
    assert loader.calls == 2, "without keep_warm the last release drops the instance"


def test_threads_keep_warm_keeps_the_instance(shm_dir: Path) -> None:
    loader = _CountingLoader(0)
    shared = SharedModel(loader, key="tw", share="threads", keep_warm=True)
    with shared.use() as first:
        pass
    with shared.use() as second:
        assert second is first
    assert loader.calls == 1


def test_processes_mode_in_one_process_unlinks_on_last_release(shm_dir: Path) -> None:
    shared = SharedModel(lambda: {"w": np.ones(50_000)}, key="solo")
    with shared.use() as model:
        assert shared.segment_name.seg_path.exists()
        assert model["w"].sum() == 50_000
    del model
    assert leftovers(shm_dir) == []


def test_copies_of_one_shared_model_meet_in_a_process(shm_dir: Path) -> None:
    import pickle

    shared = SharedModel(lambda: {"w": np.ones(50_000)}, key="copies")
    copy = pickle.loads(pickle.dumps(shared))
    assert copy.version_hash == shared.version_hash
    a = shared.acquire()
    b = copy.acquire()
    assert a is b
    shared.release(a)
    copy.release(b)
