"""share="server": real server processes, real spawned clients, real SIGKILLs."""

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
    LoaderError,
    ModelReleasedError,
    RemoteTraceback,
    Server,
    ServerDiedError,
    SharedModel,
)

from ..support import left_after, leftovers
from ..support import workers as _workers
from ..support.workers import Unsplittable, loads_counted


def _alive(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` still runs after up to ``within`` seconds (a zombie waiting for its reaper is gone)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


def test_unsplittable_model_from_four_processes(shm_dir: Path, tmp_path: Path, spawn) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(Unsplittable, counter=counter, delay=0.01), key="native",
                         share=Server(copies=2, idle_exit=0.5))
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    expected = Unsplittable()(x)
    results = spawn.Queue()
    procs = [spawn.Process(target=_workers.server_calls_worker, args=(shared, x, 20, results)) for _ in range(4)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(60)
    assert len(loads_counted(counter)) == 2, "exactly one load per copy, whatever the number of clients"
    servers = {pid for _, _, used, _ in got for pid in used}
    assert len(servers) == 2, "calls under load went to both copies"
    for pid, out, _, consistent in got:
        np.testing.assert_array_equal(out, expected)
        assert consistent
    assert left_after(shm_dir) == [], "servers with no client left remove their files and exit"
    assert not any(_alive(pid) for pid in servers)


def test_calls_are_served_in_parallel_up_to_the_copies(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(Unsplittable, delay=0.3), key="parallel",
                         share=Server(copies=2, idle_exit=0.5))
    model = shared.acquire()
    try:
        model.whoami(), model.whoami()  # both copies started
        pids, threads = [], [threading.Thread(target=lambda: pids.append(model.whoami())) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(set(pids)) == 2, "4 concurrent calls went to both copies"
    finally:
        shared.release(model)
    assert left_after(shm_dir) == []


def test_sigkill_of_the_server_mid_call_fails_fast_and_the_next_call_restarts_it(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(Unsplittable, delay=5.0), key="killed", share=Server(idle_exit=0.5))
    model = shared.acquire()
    try:
        first = model.whoami()
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                model.whoami()
            except ServerDiedError as exc:
                outcome["error"], outcome["at"] = exc, time.monotonic()

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(0.5)  # the call is running in the server
        killed_at = time.monotonic()
        os.kill(first, signal.SIGKILL)
        caller.join(10)
        assert isinstance(outcome.get("error"), ServerDiedError)
        assert outcome["at"] - killed_at < 1.0, "the caller learns of the death at once"
        assert "died during whoami" in str(outcome["error"])
        deadline = time.monotonic() + 5  # the socket closes first; the kernel drops its locks as the exit ends
        while model.servers() != [None] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert model.servers() == [None]
        x = np.ones((1, 64), dtype=np.float32)
        np.testing.assert_array_equal(model(x), Unsplittable()(x))  # a new server, same results
        assert model.servers()[0] not in (None, first)
    finally:
        shared.release(model)
    assert left_after(shm_dir) == []


def test_retries_run_the_call_again_on_a_restarted_server(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(functools.partial(Unsplittable, counter=counter), key="retried",
                         share=Server(retries=1, idle_exit=0.5))
    with shared.use() as model:
        os.kill(model.whoami(), signal.SIGKILL)
        x = np.ones((2, 64), dtype=np.float32)
        np.testing.assert_array_equal(model(x), Unsplittable()(x))
    assert len(loads_counted(counter)) == 2
    assert left_after(shm_dir) == []


def test_exceptions_come_back_with_the_remote_traceback(shm_dir: Path) -> None:
    shared = SharedModel(Unsplittable, key="raises", share=Server(idle_exit=0.5))
    with shared.use() as model:
        with pytest.raises(ValueError, match="raised inside the model") as info:
            model.boom()
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "workers.py" in str(info.value.__cause__) and "boom" in str(info.value.__cause__)
        assert model.weights.shape == (64, 64)  # a plain attribute comes back as its value
        with pytest.raises(AttributeError):
            model.no_such_method()
        x = np.ones((2, 64), dtype=np.float32)
        np.testing.assert_array_equal(model(x), Unsplittable()(x))  # the server is fine after all that
    assert left_after(shm_dir) == []


def test_a_client_killed_mid_call_leaks_nothing(shm_dir: Path) -> None:
    shared = SharedModel(functools.partial(Unsplittable, delay=1.0), key="orphan", share=Server(idle_exit=0.5))
    with shared.use() as model:
        server = model.whoami()
        fds_before = len(os.listdir(f"/proc/{server}/fd"))
        code = ("import sys, numpy as np, pickle; shared = pickle.loads(sys.stdin.buffer.read()); "
                "m = shared.acquire(); print('calling', flush=True); m(np.ones((4096, 64), dtype=np.float32))")
        import pickle

        client = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        client.stdin.write(pickle.dumps(shared))
        client.stdin.close()
        assert client.stdout.readline() == b"calling\n"
        time.sleep(0.3)
        client.kill()
        client.wait()
        client.stdout.close()
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{server}/fd")) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir(f"/proc/{server}/fd")) == fds_before, "the dead client's socket and arena are closed"
        assert model.whoami() == server
    assert left_after(shm_dir) == []
    assert not _alive(server)


def test_arrays_and_tensors_travel_through_shared_memory(shm_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    shared = SharedModel(Unsplittable, key="arrays", share=Server(idle_exit=0.5))
    with shared.use() as model:
        big = np.random.default_rng(1).random((20_000, 64), dtype=np.float32)  # 5 MiB: through the arena
        out = model(big)
        np.testing.assert_array_equal(out, Unsplittable()(big))
        assert out.flags.writeable and out.base is not None  # a private copy, valid after the next call
        again = model(big[:10])
        np.testing.assert_array_equal(out[:10], again)
        tensor_out = model(torch.from_numpy(big[:100]))
        assert isinstance(tensor_out, torch.Tensor)
        np.testing.assert_array_equal(tensor_out.numpy(), Unsplittable()(big[:100]))
    assert left_after(shm_dir) == []


def test_a_loader_that_fails_in_the_server_raises_a_clear_error(shm_dir: Path) -> None:
    def broken() -> object:
        raise RuntimeError("no weights at /nowhere")

    shared = SharedModel(broken, key="broken", share=Server(idle_exit=0.5))
    with pytest.raises(LoaderError, match="no weights at /nowhere"):
        shared.acquire()  # every copy is started (and loaded) when the model is acquired
    assert left_after(shm_dir) == []


def test_only_the_same_user_can_connect(shm_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    shared = SharedModel(Unsplittable, key="private", share=Server(idle_exit=0.5))
    with shared.use() as model:
        model.whoami()
        sock = next(shm_dir.glob("*.sock"))
        code = ("import os, socket; os.setgid(65534); os.setuid(65534)  # another user (nobody)\n"
                f"s = socket.socket(socket.AF_UNIX); s.connect({str(sock)!r})")
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "PermissionError" in other.stderr
    assert left_after(shm_dir) == []


def test_a_socket_path_too_long_for_unix_sockets_says_what_to_do(tmp_path: Path) -> None:
    from modelshare import SegmentDirectoryError

    shared = SharedModel(dict, key="k" * 100, share="server", directory=tmp_path)
    with pytest.raises(SegmentDirectoryError, match=r"Unix sockets allow 107: use a shorter key"):
        shared.acquire()
    assert leftovers(tmp_path) == []


def test_server_options_are_checked() -> None:
    with pytest.raises(TypeError, match="devices"):
        SharedModel(Unsplittable, key="x", share="processes", devices=["cpu"])  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="copies must be a positive int"):
        Server(copies=0)
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        Server(retries=-1)
    with pytest.raises(ValueError, match=r"keep_warm=.*Server\(idle_exit=...\)"):
        SharedModel(Unsplittable, key="x", share="server", keep_warm=True)
    with pytest.raises(ValueError, match="takes no codec"):
        SharedModel(Unsplittable, key="x", share="server", codec="generic")
    assert SharedModel(Unsplittable, key="x", share=Server(devices=["cpu", "cpu", "cpu"])).mode.copies == 3


def test_a_released_client_says_so(shm_dir: Path) -> None:
    shared = SharedModel(Unsplittable, key="released", share=Server(idle_exit=0.5))
    model = shared.acquire()
    model.whoami()
    shared.release(model)
    with pytest.raises(ModelReleasedError, match="was released"):
        model.whoami()
    assert left_after(shm_dir) == []


def test_modelshare_ls_shows_servers_and_gc_cleans_after_a_crash(shm_dir: Path) -> None:
    import json

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), *args],
                              capture_output=True, text=True, check=True).stdout

    shared = SharedModel(Unsplittable, key="listed", share=Server(copies=2, idle_exit=0.5))
    with shared.use() as model:
        model.whoami(), model.whoami()
        table = cli("ls")
        assert "SERVER" in table and "listed" in table and "serving" in table
        servers = json.loads(cli("ls", "--json", "--servers"))
        assert sorted(s["copy"] for s in servers) == [0, 1] and all(s["clients"] == 1 for s in servers)
        assert sum(s["calls"] for s in servers) >= 2
        for pid in model.servers():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert "dead (modelshare gc)" in cli("ls")
        assert "removed 8 file(s)" in cli("gc")  # each copy's socket, status table, log and start lock
    assert left_after(shm_dir) == []


def test_copies_spread_over_the_given_devices(shm_dir: Path) -> None:
    shared = SharedModel(_workers.OnDevice, key="devices", share=Server(devices=["cpu:0", "cpu:1", "cpu:0"],
                                                                        idle_exit=0.5))
    with shared.use() as model:
        seen = {}
        for _ in range(12):
            device, env, pid = model.where()
            assert device == env
            seen[pid] = device
        assert sorted(seen.values()) == ["cpu:0", "cpu:0", "cpu:1"], "three copies, placed round robin"
    assert left_after(shm_dir) == []
