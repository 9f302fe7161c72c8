"""Server mode gives every call its own answer -- or a clear error -- whatever happens around it:
interrupted calls, signals, hung models, noisy or slow loaders, servers killed while starting,
arguments that cannot travel, huge in-band results. (Forks: ``tests/test_process.py``.)"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelshare import (
    AcquireTimeoutError,
    CallTimeoutError,
    EncodeError,
    LoaderError,
    Server,
    ServerDiedError,
    SharedModel,
)
from modelshare._host.locks import lock_holders
from modelshare._owners.server import ServerFiles

from ..support import ROOT, left_after, leftovers
from ..support.workers import Unloadable, Unsplittable, loads_counted, noisy_model, slow_model

EXPECTED = Unsplittable()


def _x(value: float, rows: int = 1) -> np.ndarray:
    return np.full((rows, 64), value, dtype=np.float32)


class _Interrupt(Exception):
    """What a user's signal handler raises."""


def _interrupt_after(seconds: float, exc: type[BaseException]) -> None:
    def handler(*_: object) -> None:
        raise exc("interrupted by a signal")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


@pytest.mark.parametrize("raised", [TimeoutError, KeyboardInterrupt, _Interrupt])
@pytest.mark.parametrize("rows", [1, 300])  # 300 x 64 float32: through the shared-memory arena
def test_an_interrupted_call_leaves_no_reply_for_the_next_one(shm_dir: Path, raised: type, rows: int) -> None:
    shared = SharedModel(Unsplittable, key="interrupted", share=Server(retries=2, idle_exit=0.5))
    previous = signal.getsignal(signal.SIGALRM)
    with shared.use() as model:
        try:
            _interrupt_after(0.2, raised)
            with pytest.raises(raised, match="interrupted by a signal"):  # the user's exception, unchanged
                model.slow(_x(201.0, rows), 1.0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        for value in (5.0, 6.0, 7.0):  # each answer is its own call's, never the interrupted one's
            np.testing.assert_array_equal(model(_x(value, rows)), EXPECTED(_x(value, rows)))
        time.sleep(1.0)  # the interrupted call has finished in the server by now
        assert model.seen() == 1 + 3, "the interrupted call ran once: not retried, the server never died"
    assert left_after(shm_dir) == []


def test_arguments_that_cannot_travel_say_so_and_are_not_retried(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(Unsplittable, counter=counter), key="args",
                         share=Server(retries=2, idle_exit=0.5))
    with shared.use() as model:
        with pytest.raises(EncodeError, match=r"arguments of __call__\(\.\.\.\) cannot be sent.*lock"):
            model(threading.Lock())
        with pytest.raises(TypeError, match="could not unpickle the call's arguments.*cannot be rebuilt"):
            model(Unloadable())
        np.testing.assert_array_equal(model(_x(3.0)), EXPECTED(_x(3.0)))
        assert model.seen() == 1
    assert len(loads_counted(counter)) == 1, "no call was retried on a new server: the server never died"
    assert left_after(shm_dir) == []


def test_a_hung_call_times_out_and_holds_no_call_another_copy_could_take(shm_dir: Path) -> None:
    shared = SharedModel(Unsplittable, key="hung", share=Server(copies=2, call_timeout=2.0, idle_exit=0.5))
    with shared.use() as model:
        model(_x(0.0)), model(_x(0.0))  # both copies up
        started = time.monotonic()
        with pytest.raises(CallTimeoutError, match=r"took longer than call_timeout=2 s"):
            model.slow(_x(1.0), 20.0)  # one copy hangs for 20 s
        assert time.monotonic() - started < 10
        waits: list[float] = []
        errors: list[BaseException] = []

        def caller(value: float) -> None:
            for _ in range(10):
                began = time.monotonic()
                try:
                    np.testing.assert_array_equal(model(_x(value)), EXPECTED(_x(value)))
                except BaseException as exc:  # noqa: BLE001 -- reported below
                    errors.append(exc)
                waits.append(time.monotonic() - began)

        threads = [threading.Thread(target=caller, args=(float(i),)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [] and len(waits) == 60
        assert max(waits) < 10, "a call waited behind the hung one although the other copy was free"
    assert left_after(shm_dir, timeout=60) == []


def test_loader_output_goes_to_a_log_and_blocks_nothing(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(noisy_model, 200_000, 200_000), key="noisy", share=Server(idle_exit=0.5))
    with shared.use() as model:
        np.testing.assert_array_equal(model(_x(2.0)), EXPECTED(_x(2.0)))
        log = ServerFiles(shared.segment_name, 0).log.read_text()
        assert log.startswith("loading the model...") and "warming up!!!" in log and len(log) > 400_000
    assert left_after(shm_dir) == []


def test_a_failed_start_quotes_its_output_and_leaves_nothing(shm_dir: Path) -> None:
    def loader() -> None:
        print("reading weights from /models/x.pt")
        raise FileNotFoundError("/models/x.pt")

    shared = SharedModel(loader, key="failing", share=Server(idle_exit=0.5))
    with pytest.raises(LoaderError, match=r"(?s)failed to start.*reading weights from /models/x.pt.*FileNotFoundError"):
        shared.acquire()
    assert leftovers(shm_dir) == [], "no log, socket, status or lock left behind"


def test_timeout_bounds_the_start_and_stops_the_server(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(slow_model, 25.0, counter), key="slow-start", share=Server(),
                         timeout=3.0)
    started = time.monotonic()
    with pytest.raises(AcquireTimeoutError, match=r"did not start within 3 s \(it was stopped\)"):
        shared.acquire()
    assert time.monotonic() - started < 10
    assert leftovers(shm_dir) == []
    (pid,) = loads_counted(counter)  # the server that was loading
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid), "the server that did not start in time is still loading"


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("retries", [0, 1])
def test_a_server_killed_while_starting_is_a_dead_server_and_retries_apply(shm_dir: Path, tmp_path: Path,
                                                                        retries: int) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(slow_model, 2.0, counter), key="killed-start",
                         share=Server(retries=retries, idle_exit=0.5))
    status = ServerFiles(shared.segment_name, 0).status

    def kill_the_first() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            holders = lock_holders(status) if status.exists() else []
            if holders:
                os.kill(holders[0], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first)
    killer.start()
    try:
        if retries:
            with shared.use() as model:  # the retry started a new server
                np.testing.assert_array_equal(model(_x(4.0)), EXPECTED(_x(4.0)))
        else:
            with pytest.raises(ServerDiedError, match="died while starting"):
                shared.acquire()
    finally:
        killer.join(60)
    assert left_after(shm_dir) == []


def test_recovery_after_a_sigkill_between_calls_does_not_depend_on_timing(shm_dir: Path) -> None:
    shared = SharedModel(Unsplittable, key="recovers", share=Server(idle_exit=0.5))
    with shared.use() as model:
        for value in range(8):
            (pid,) = model.servers()
            os.kill(pid, signal.SIGKILL)  # no pause: the very next call must start a new server
            np.testing.assert_array_equal(model(_x(float(value))), EXPECTED(_x(float(value))))
            assert model.servers()[0] not in (None, pid)
    assert left_after(shm_dir) == []


def test_huge_in_band_results_and_arenas_that_shrink(shm_dir: Path) -> None:
    shared = SharedModel(Unsplittable, key="huge", share=Server(idle_exit=0.5))
    with shared.use() as model:
        blob = model.blob(64 << 20)  # a bytes object: in the pickle, not the arena
        assert len(blob) == 64 << 20 and blob[:16] == b"0123456789abcdef" and blob[-3:] == blob[len(blob) - 3:]
        big = np.ones((64 << 20) // 4, dtype=np.float32)
        assert model.slow(big, 0.0).sum() == big.size  # a 64 MiB arena, both ways
        channel = model._local.channels[0]
        assert channel.arena is not None and channel.arena.size >= 64 << 20
        np.testing.assert_array_equal(model(_x(1.0)), EXPECTED(_x(1.0)))  # a small call after the large one
        assert channel.arena is None, "the 64 MiB arena was let go once a small call needed none"
    assert left_after(shm_dir) == []


def test_resource_errors_are_not_dead_servers(shm_dir: Path) -> None:
    code = f"""
import resource, sys, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from modelshare import Server, ServerDiedError, SharedModel
from tests.support.workers import Unsplittable
shared = SharedModel(Unsplittable, key="emfile", share=Server(idle_exit=0.5), directory={str(shm_dir)!r})
with shared.use() as model:
    model(np.ones((1, 64), dtype=np.float32))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    import os
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        model(np.ones((4096, 64), dtype=np.float32))  # needs a new arena: a descriptor
    except ServerDiedError as exc:
        print("WRONG", exc)
    except OSError as exc:
        print("OSERROR", exc.errno)
    for fd in held:
        os.close(fd)
    print("AFTER", float(model(np.ones((1, 64), dtype=np.float32)).sum()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "OSERROR 24" in out.stdout and "WRONG" not in out.stdout, out.stdout + out.stderr
    assert "AFTER" in out.stdout
    assert left_after(shm_dir) == []


def test_a_server_whose_directory_was_removed_still_leaves() -> None:
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="modelshare-test-", dir="/dev/shm"))
    shared = SharedModel(Unsplittable, key="orphaned", share=Server(idle_exit=0.5), directory=directory)
    with shared.use() as model:
        (pid,) = model.servers()
        shutil.rmtree(directory)  # a test's fixture, a user's rm -rf: while the server runs
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(pid), "the server outlived its directory"


_TWO_IDLE_TIMERS = """
import sys, threading
from modelshare import Server, SharedModel
from modelshare._host.trust import ensure_directory
from modelshare._owners.server import ServerFiles, _Server
from tests.support.workers import Unsplittable
shared = SharedModel(Unsplittable, key="timers", share=Server(), directory=ensure_directory(sys.argv[1]))
files = ServerFiles(shared.segment_name, 0)
server = _Server(Unsplittable(), files, "", 0.0, files.hold_status())
remove = files.remove

def remove_then_second_timer(**kwargs):
    removed = remove(**kwargs)  # the start file is gone; this process is about to exit
    second = threading.Thread(target=server._exit_if_idle)
    second.start()
    second.join(1.0)  # a second idle timer fires right now
    return removed

object.__setattr__(files, "remove", remove_then_second_timer)
server._exit_if_idle()
"""


def test_a_second_idle_timer_at_the_exit_leaves_no_start_file(shm_dir: Path) -> None:
    """Two idle timers of one server fire together (a loaded machine delays one): the one that
    exits removes the files, and the other must not create the start file anew on its way."""
    out = subprocess.run([sys.executable, "-c", _TWO_IDLE_TIMERS, str(shm_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert leftovers(shm_dir) == []
