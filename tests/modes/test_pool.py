"""Threads(instances=N) / Processes(instances=N): N instances in a process over one copy of the weights."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from modelshare import InstancePool, Processes, SharedModel, Threads

from ..support import leftovers
from ..support.workers import NotThreadSafe, Unsplittable, loads_counted


def _hammer(model, x, threads: int = 6, calls: int = 5) -> list[BaseException]:
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(calls):
            try:
                np.testing.assert_array_equal(model(x), x @ np.ones((256, 256), dtype=np.float32))
            except BaseException as exc:  # noqa: BLE001 -- collected for the assertion
                errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors


def test_not_thread_safe_model_needs_instances(shm_dir: Path) -> None:
    x = np.ones((2, 256), dtype=np.float32)
    assert _hammer(NotThreadSafe(), x), "the model really is not thread-safe"
    for share in (Threads(instances=3), Processes(instances=3)):
        shared = SharedModel(NotThreadSafe, key=f"pool-{share.name}", share=share)
        with shared.use() as pool:
            assert isinstance(pool, InstancePool) and len(pool) == 3
            assert _hammer(pool, x) == []
            addresses = {m.weights.__array_interface__["data"][0] for m in pool.instances}
            assert len(addresses) == 1, f"{share}: the instances share one copy of the weights"
            assert pool.weights.shape == (256, 256)  # a plain attribute is the first instance's
            with pool.instance() as one:
                assert one in pool.instances
    del pool, one
    assert leftovers(shm_dir) == []


def test_a_model_the_codec_cannot_rebuild_is_loaded_per_instance(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(Unsplittable, counter=counter), key="reload", share=Threads(instances=2))
    with shared.use() as pool:
        assert len(pool) == 2 and pool.instances[0] is not pool.instances[1]
        assert pool.whoami() > 0
    assert len(loads_counted(counter)) == 2
