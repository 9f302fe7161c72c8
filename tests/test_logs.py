"""The ``modelshare`` logger: loads, attaches, waits, evictions, server starts and deaths -- in real
processes; and ``loaded_here`` only where the loader ran."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelshare import Budget, ModelRouter, Server, SharedModel

from .support import ROOT, eventually, left_after
from .support.workers import MiB, Unsplittable, blob

ATTACH_OR_WAIT = textwrap.dedent("""
    import functools, logging, sys
    from modelshare import SharedModel
    from modelshare._host import locks
    from tests.support.workers import make_mlp
    locks.WAIT_REPORT_EVERY = 0.2  # the waiting line every 0.2 s here (10 s by default)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    shared = SharedModel(functools.partial(make_mlp, 4, 256, 0, None, 2.0), key="logged", directory=sys.argv[1])
    model = shared.acquire()
    print("loaded_here", shared.hold_info().loaded_here, flush=True)
    sys.stdin.read()  # hold until told
""")


def _start(directory: Path) -> subprocess.Popen:
    """A process that acquires the model (its loader takes 2 s) and holds it until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", ATTACH_OR_WAIT, str(directory)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_load_an_attach_and_a_wait_are_logged(shm_dir: Path) -> None:
    loader = _start(shm_dir)
    try:
        assert eventually(lambda: any(shm_dir.glob("*.lock")), timeout=60)
        waiter = _start(shm_dir)  # meets the load under way
        try:
            assert loader.stdout.readline().split() == ["loaded_here", "True"]
            assert waiter.stdout.readline().split() == ["loaded_here", "False"]
        finally:
            _, attached = waiter.communicate("", timeout=60)
    finally:
        _, loaded = loader.communicate("", timeout=60)
    assert "modelshare._modes.processes loaded model 'logged' (version " in loaded, loaded
    assert f"waiting for pid {loader.pid} loading 'logged'" in attached, attached
    assert "modelshare._modes.processes attached to model 'logged'" in attached, attached
    assert left_after(shm_dir) == []


def test_loaded_here_is_false_in_a_forked_child(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(blob, 1), key="forked")
    model = shared.acquire()
    assert shared.hold_info().loaded_here
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it inherited the model, it did not load it
        os.write(write, b"1" if shared.hold_info().loaded_here else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"0", "a forked child reported that it ran the loader"
    os.waitpid(pid, 0)
    os.close(read)
    assert shared.hold_info().loaded_here, "the parent still did"
    shared.release(model)


def test_an_eviction_is_logged(shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = {k: SharedModel(functools.partial(blob, 4, i), key=k, directory=shm_dir) for i, k in enumerate("ab")}
    router = ModelRouter(models, budget=Budget(host=6 * MiB), load_overhead=1.0)
    with caplog.at_level(logging.INFO, logger="modelshare"):
        with router.use("a"):
            pass
        with router.use("b"):
            pass
    assert any(r.name == "modelshare._router.router" and "evicted a--" in r.getMessage()
               and "to make room for 'b'" in r.getMessage() for r in caplog.records), caplog.text
    from modelshare._host.inventory import evict

    evict(models["b"].segment_name)
    for path in shm_dir.glob("router.*"):
        path.unlink()


def test_a_server_start_and_death_are_logged(shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    shared = SharedModel(Unsplittable, key="served", share=Server(idle_exit=0.5))
    with caplog.at_level(logging.INFO, logger="modelshare"):
        with shared.use() as model:
            first = model.whoami()
            os.kill(first, signal.SIGKILL)
            assert eventually(lambda: model.servers() == [None], timeout=10)
            second = model.whoami()  # never taken by the dead server: sent to a new one
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("modelshare")]
    for pid in (first, second):
        assert any(m.startswith(f"started the server for model 'served' (copy 0): pid {pid}") for m in messages), \
            messages
    assert any("the server of model 'served' (copy 0) is gone" in m and "whoami(...) goes to a new one" in m
               for m in messages), messages
    assert left_after(shm_dir) == []


def test_the_library_installs_no_handler() -> None:
    code = ("import logging, modelshare, modelshare.cli, modelshare.loaders; print(sorted(n for n, l in "
            "logging.root.manager.loggerDict.items() if n.startswith('modelshare') and getattr(l, 'handlers', None)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", "a library leaves handlers to the application"


_UNCONFIGURED = """
import sys
from modelshare._log import Log
Log("modelshare.test").info("an info %s", "nobody could see")
assert "logging" not in sys.modules, "an INFO record nobody could see imported logging"
Log("modelshare.test").warning("a warning %s", "without logging configured")  # the last resort prints it
import logging
logging.basicConfig(level=logging.INFO, format="%(name)s %(funcName)s:%(lineno)d %(message)s")
def caller():
    Log("modelshare.test").info("an info %s", "once logging is configured")
caller()
"""


def test_info_records_import_logging_only_once_someone_could_see_them() -> None:
    """``import logging`` costs a worker 0.6 MiB; before a program imports it, no logger can be set
    to INFO, so an INFO record is dropped without it -- and warnings, and every record once logging is
    configured, come out as ``logging`` would print them (with the caller's function and line). A
    worker's acquire logs at INFO: tests/codecs/test_onnx.py checks that it does not load logging."""
    run = subprocess.run([sys.executable, "-c", _UNCONFIGURED], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0] == "a warning without logging configured", lines
    assert "modelshare.test caller:10 an info once logging is configured" in lines, lines
