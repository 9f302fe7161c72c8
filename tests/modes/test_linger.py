"""linger: a process keeps its hold a while after its last release, so use() per request does not
reload the model -- in real processes, across fork and exit."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modelshare import SharedModel

from ..support import ROOT, eventually, left_after
from ..support.workers import loads_counted, make_mlp

PER_REQUEST = textwrap.dedent("""
    import functools, random, sys, time
    from modelshare import SharedModel
    from tests.support.workers import make_mlp, sample_input
    shared = SharedModel(functools.partial(make_mlp, 4, 256, 0, sys.argv[1]), key="served", linger=float(sys.argv[2]))
    def handle(x):  # a request handler: use() per request
        with shared.use() as model:
            return model(x)
    for request in range(20):  # a pause between requests
        handle(sample_input(256))
        time.sleep(random.uniform(0.0, 0.1))
""")


def _serve(counter: Path, linger: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PER_REQUEST, str(counter), str(linger)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("linger", [0.0, 2.0], ids=["linger=0", "linger=2"])
def test_use_per_request_loads_once_while_it_lingers(linger: float, tmp_path: Path, shm_dir: Path) -> None:
    """Two worker processes serving 20 requests each with use(): with a linger, one load; without
    one, the last release between two requests unlinks the segment and the next request reloads."""
    counter = tmp_path / "loads"
    workers = [_serve(counter, linger) for _ in range(2)]
    for worker in workers:
        assert worker.wait(120) == 0, worker.stderr.read()
    loads = len(loads_counted(str(counter)))
    if linger:
        assert loads == 1, f"{loads} loads for 40 requests"
    else:
        assert loads > 2, "without a linger, requests reload (what the linger is for)"
    assert left_after(shm_dir) == [], "the workers exited: nothing lingers after them"


def test_a_lingering_hold_is_taken_again_then_let_go(tmp_path: Path, shm_dir: Path) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(make_mlp, 4, 256, 0, counter), key="lingers", linger=1.0)
    with shared.use():
        pass
    (segment,) = shm_dir.glob("*.seg")
    assert shared.hold_info() is not None, "released, but kept for the linger"
    time.sleep(0.6)
    model = shared.acquire()  # within the linger: the same hold, no load
    time.sleep(0.8)  # past the first linger's end: taken again, so kept
    assert segment.exists() and shared.hold_info() is not None
    shared.release(model)
    del model
    assert eventually(lambda: shared.hold_info() is None and not segment.exists(), timeout=10), \
        "a second after the last release, the hold is let go and the segment unlinked"
    assert len(loads_counted(counter)) == 1


def test_a_forked_child_lets_go_of_an_inherited_lingering_hold(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(make_mlp, 4, 256), key="forked", linger=0.5)
    with shared.use():
        pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child inherited the lingering hold; its own reaper ends it
        let_go = eventually(lambda: shared.hold_info() is None, timeout=10)
        os.write(write, b"1" if let_go else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1", "the child kept its inherited hold past the linger"
    os.waitpid(pid, 0)
    os.close(read)
    assert eventually(lambda: shared.hold_info() is None, timeout=10)
    assert left_after(shm_dir) == []


def test_the_default_and_bad_lingers() -> None:
    code = "from modelshare import SharedModel; print(SharedModel(dict, key='k').linger)"
    env = {k: v for k, v in os.environ.items() if k != "MODELSHARE_LINGER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "10.0", out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(env, MODELSHARE_LINGER="2.5"))
    assert out.stdout.strip() == "2.5", out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(env, MODELSHARE_LINGER="soon"))
    assert "$MODELSHARE_LINGER must be a number of seconds >= 0, not 'soon'" in out.stderr
    for bad in (-1, "10", True, float("nan")):
        with pytest.raises(ValueError, match="linger must be a number of seconds >= 0"):
            SharedModel(dict, key="k", linger=bad)  # type: ignore[arg-type]


def test_release_with_linger_zero_lets_go_now(shm_dir: Path) -> None:
    """A shutdown hook (uvicorn's lifespan, whose worker then dies by a re-raised SIGTERM and skips
    exit handlers) lets go at once whatever the SharedModel's linger says."""
    shared = SharedModel(functools.partial(make_mlp, 4, 256), key="shutdown", linger=60)
    model = shared.acquire()
    shared.release(model, linger=0)
    del model
    assert shared.hold_info() is None and left_after(shm_dir) == []
    model = shared.acquire()
    with pytest.raises(ValueError, match="linger must be a number of seconds >= 0"):
        shared.release(model, linger=-1)
    shared.release(model, linger=0)  # the refused release changed nothing
