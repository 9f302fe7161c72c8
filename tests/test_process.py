"""One owner of this process's holds (``_process``): what a fork and the exit do to each kind --
server connections, segment holds -- tried with real forks (``os.fork`` and fork-start pools)."""

from __future__ import annotations

import functools
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np

from modelshare import Server, SharedModel

from .support import left_after, leftovers
from .support.workers import Unsplittable, make_mlp, sample_input

EXPECTED = Unsplittable()


def _wrong_answers(model: Any, seed: int, calls: int) -> int:
    """Calls with inputs only this caller sends (small ones in the socket, large ones through the
    arena); how many answers were not its own."""
    wrong = 0
    for i in range(calls):
        rows = 300 if i % 3 == 0 else 1  # 300 x 64 float32 = 75 KiB: through shared memory
        x = np.full((rows, 64), seed * 1000 + i, dtype=np.float32)
        if not np.array_equal(model(x), EXPECTED(x)):
            wrong += 1
    return wrong


def _forked_caller(model: Any, seed: int, calls: int, results: Any) -> None:
    results.put((seed, _wrong_answers(model, seed, calls)))


def test_forked_children_never_get_their_parents_answers(shm_dir: Path) -> None:
    shared = SharedModel(Unsplittable, key="forked", share=Server(idle_exit=0.5))
    model = shared.acquire()
    assert _wrong_answers(model, 0, 3) == 0  # the parent's connection and arena exist before the fork
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    children = [fork.Process(target=_forked_caller, args=(model, seed, 150, results)) for seed in range(1, 5)]
    for child in children:
        child.start()
    parent_wrong = _wrong_answers(model, 9, 150)  # the parent keeps calling meanwhile
    outcomes = dict(results.get(timeout=120) for _ in children)
    for child in children:
        child.join(60)
    pid = os.fork()  # a bare os.fork too (gunicorn --preload, Celery prefork)
    if pid == 0:
        os._exit(min(_wrong_answers(model, 7, 60), 100))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the os.fork child got answers that were not its own"
    assert parent_wrong == 0 and outcomes == {1: 0, 2: 0, 3: 0, 4: 0}
    assert _wrong_answers(model, 8, 30) == 0, "the parent's connection survived its children"
    shared.release(model)
    assert left_after(shm_dir) == [], "the server left once its last client (the parent) did"


def _hold_until(ready: Any, event: Any) -> None:
    ready.set()  # the at-fork hooks have run: the child holds its own lock
    event.wait(60)  # holds what the parent held at the fork; released at exit by the exit hook


def test_a_fork_start_child_releases_at_exit_what_it_inherited(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(make_mlp, 2, width=256), key="inherited")
    model = shared.acquire()
    expected = model(sample_input(256))
    fork = multiprocessing.get_context("fork")
    ready, done = fork.Event(), fork.Event()
    child = fork.Process(target=_hold_until, args=(ready, done))
    child.start()
    shared.release(model)  # at once: the lock the child holds was taken before the fork
    del model
    assert shared.segment_name.seg_path.exists(), "the parent's release did not take the child's segment away"
    assert ready.wait(60)
    assert shared.holders() == [child.pid], "the child holds it on a lock of its own, under its own pid"
    with shared.use() as again:  # still there for a new holder in the parent
        np.testing.assert_array_equal(again(sample_input(256)), expected)
    del again
    done.set()
    child.join(60)
    assert child.exitcode == 0
    assert leftovers(shm_dir) == [], "the child's exit hook was the last release: it unlinked the segment"


_IMPORTED_FIRST = """
import sys
import numpy as np
from modelshare import SharedModel
assert "multiprocessing" not in sys.modules, "importing modelshare imported multiprocessing"
shared = SharedModel(lambda: np.ones(1 << 20), key="late")
model = shared.acquire()
import multiprocessing  # after modelshare: the exit hook is installed at the first fork

fork = multiprocessing.get_context("fork")
ready, done = fork.Event(), fork.Event()
child = fork.Process(target=lambda: (ready.set(), done.wait(60)))
child.start()
shared.release(model)
del model
assert ready.wait(60) and shared.holders() == [child.pid], shared.holders()
done.set()
child.join(60)
assert child.exitcode == 0
print(shared.segment_name.seg_path.exists())
"""


def test_multiprocessing_imported_after_modelshare_still_releases_at_a_childs_exit(shm_dir: Path) -> None:
    """modelshare does not import multiprocessing (~1.7 MiB a process with what it pulls in); a
    fork-start child of a program that imports it later still releases what it inherited at exit."""
    import subprocess
    import sys

    from .support import ROOT

    out = subprocess.run([sys.executable, "-c", _IMPORTED_FIRST], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "MODELSHARE_DIR": str(shm_dir)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False", "the child's exit hook did not release: the segment is still there"
    assert leftovers(shm_dir) == []
