"""The trust boundary (``_host.trust``), tried as another local user and a careless one would: nothing
foreign is deleted, unpickled, connected to or signalled, and nothing hangs.

A second uid needs root (it can become any uid without an account); those tests skip with the
reason elsewhere.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from modelshare import (
    SegmentDirectoryError,
    Server,
    SharedModel,
    UntrustedFileError,
    UntrustedFileWarning,
    gc_segments,
    list_segments,
)
from modelshare._host.trust import ensure_directory

from ..support import ROOT, leftovers

OTHER = 4242  # another local user (no account needed: root becomes it)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second uid needs root (it can become any uid)")


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _python_for_another_user() -> str:
    """A Python the other uid may run (this one may live under root's home), or skip."""
    for candidate in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([candidate, "-c", "pass"], user=OTHER, group=OTHER, timeout=30).returncode == 0:
                return candidate
        except OSError:
            continue
    pytest.skip("no Python here that another uid may run")


def _cli(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(directory), *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


class Booby:
    """A model whose unpickling leaves a mark: what a planted segment would run in its victim."""

    def __init__(self, mark: str) -> None:
        self.mark = mark
        self.weights = np.ones(4096)

    def __setstate__(self, state: dict) -> None:
        Path(state["mark"]).write_text("unpickled")
        self.__dict__.update(state)


# -- the directory ----------------------------------------------------------------------------


@as_root
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = _private(tmp_path / "theirs")
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(SegmentDirectoryError, match=rf"belongs to uid {OTHER}, not to this user.*MODELSHARE_DIR"):
        SharedModel(dict, key="m", directory=theirs).acquire()


@pytest.mark.parametrize("mode", [0o1777, 0o770, 0o702])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared_dir = _private(tmp_path / "shared")
    os.chmod(shared_dir, mode)
    with pytest.raises(SegmentDirectoryError, match=r"is writable by .*plant models.*chmod go-w"):
        SharedModel(dict, key="m", directory=shared_dir).acquire()
    assert leftovers(shared_dir) == []


def test_dev_shm_itself_is_refused_and_the_error_says_what_to_use() -> None:
    with pytest.raises(SegmentDirectoryError, match=r"/dev/shm .*(belongs to uid 0|writable by).*modelshare-<name>"):
        ensure_directory(Path("/dev/shm"))


def test_a_symlink_is_not_followed_even_to_a_directory_of_ones_own(tmp_path: Path) -> None:
    real = _private(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(SegmentDirectoryError, match=r"is a symlink .*does not follow it"):
        SharedModel(dict, key="m", directory=tmp_path / "link").acquire()


@as_root
def test_a_directory_inside_one_another_user_could_swap_is_refused(tmp_path: Path) -> None:
    theirs = _private(tmp_path / "theirs")
    mine = _private(theirs / "mine")
    os.chown(theirs, OTHER, OTHER)
    with pytest.raises(SegmentDirectoryError, match=rf"lies under {theirs} \(uid {OTHER}.*could rename or replace"):
        ensure_directory(mine)


def test_a_project_folder_is_never_swept(tmp_path: Path) -> None:
    project = _private(tmp_path / "project")
    planted = {"poetry.lock": b"[[package]]", "yarn.lock": b"# yarn", "labels_0001.seg": b"labels",
               "Cargo.lock": b"version = 3", "held.lock": b""}
    for name, data in planted.items():
        (project / name).write_bytes(data)
    holder = open(project / "held.lock")  # a lock another program holds
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        shared = SharedModel(lambda: {"w": np.ones(1000)}, key="m", directory=project)
        with pytest.warns(UntrustedFileWarning, match=r"not swept: it holds files modelshare did not make"):
            with shared.use() as model:
                assert model["w"].sum() == 1000
        del model
        out = _cli(project, "gc")
        assert out.returncode == 0 and "not swept" in out.stderr and "removed 0 file(s)" in out.stdout
        assert gc_segments(project, include_warm=True) == []
    finally:
        holder.close()
    assert {p.name: p.read_bytes() for p in project.iterdir()} == planted, "every file of the project is intact"


# -- files in the directory -----------------------------------------------------------------------


def _planted_segment(directory: Path, mark: Path, key: str = "victim") -> SharedModel:
    """A segment (a real one, of a model whose unpickling leaves ``mark``) at the path the victim's
    model maps, published elsewhere and moved in."""
    victim = SharedModel(lambda: {"w": np.zeros(4096)}, key=key, version="1", directory=directory)
    staging = _private(directory.parent / "staging")
    attacker = SharedModel(lambda: Booby(str(mark)), key=key, version="1", directory=staging, keep_warm=True)
    with attacker.use():
        pass
    mark.unlink()  # made by the attacker's own attach: the victim's must not make it again
    os.replace(attacker.segment_name.seg_path, victim.segment_name.seg_path)
    shutil.rmtree(staging)
    return victim


@as_root
def test_a_segment_of_another_user_is_never_unpickled_listed_or_deleted(tmp_path: Path) -> None:
    directory = _private(tmp_path / "mine")
    mark = tmp_path / "mark"
    victim = _planted_segment(directory, mark)
    os.chown(victim.segment_name.seg_path, OTHER, OTHER)
    with pytest.raises(UntrustedFileError, match=rf"belongs to uid {OTHER}"):
        victim.acquire()
    assert not mark.exists(), "nothing of the planted file was unpickled"
    with pytest.warns(UntrustedFileWarning):
        assert list_segments(directory) == []
    listed = _cli(directory, "ls")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr and f"uid {OTHER}" in listed.stderr
    assert _cli(directory, "gc").returncode == 0
    assert victim.segment_name.seg_path.exists(), "another user's file is not deleted"
    victim.segment_name.seg_path.unlink()
    victim.segment_name.lock_path.unlink(missing_ok=True)


def test_a_fifo_or_symlink_named_like_a_segment_hangs_nothing(tmp_path: Path) -> None:
    directory = _private(tmp_path / "mine")
    fifo = SharedModel(lambda: {"w": np.zeros(8)}, key="fifo", directory=directory, timeout=5)
    os.mkfifo(fifo.segment_name.seg_path)
    link = SharedModel(lambda: {"w": np.zeros(8)}, key="link", directory=directory)
    os.symlink(tmp_path / "elsewhere", link.segment_name.seg_path)
    outcome: list[BaseException] = []
    caller = threading.Thread(target=lambda: outcome.extend(_raised(fifo.acquire)), daemon=True)
    caller.start()
    caller.join(20)
    assert not caller.is_alive(), "acquire() hung on a FIFO"
    assert isinstance(outcome[0], UntrustedFileError) and "is a FIFO" in str(outcome[0])
    with pytest.raises(UntrustedFileError, match="is a symlink"):
        link.acquire()
    for command in ("ls", "gc", "verify"):
        out = _cli(directory, command)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (command, out.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo.segment_name.seg_path).st_mode) and os.path.islink(link.segment_name.seg_path)
    shutil.rmtree(directory)


def _raised(call) -> list[BaseException]:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
        return [exc]
    return []


# -- sockets and signals ------------------------------------------------------------------------


_FAKE_SERVER = """
import os, pickle, socket, sys
staging, mark = sys.argv[1], sys.argv[2]
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(staging, "fake.sock"))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
class Boom:
    def __reduce__(self):
        return (open, (mark, "w"))
body = pickle.dumps(("hello", Boom(), 0), protocol=5)
import struct
conn.sendall(struct.pack("!IIi", len(body), 0, 0) + body)
print("sent", flush=True)
conn.recv(1)
"""


@as_root
@pytest.mark.parametrize("socket_owner", [OTHER, 0])
def test_a_socket_another_user_serves_is_never_read(socket_owner: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="modelshare-test-", dir="/dev/shm"))  # mode 0700, as ours are
    staging = Path(tempfile.mkdtemp(prefix="modelshare-staging-", dir="/dev/shm"))  # where the other uid can bind
    os.chmod(staging, 0o1777)
    mark = staging / "mark"
    fake = subprocess.Popen([_python_for_another_user(), "-c", _FAKE_SERVER, str(staging), str(mark)], user=OTHER,
                            group=OTHER, stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline() == "listening\n"
        shared = SharedModel(dict, key="served", share=Server(idle_exit=0.5), directory=directory, timeout=10)
        sock = shared.segment_name.owner_path("copy0", ".sock")
        os.replace(staging / "fake.sock", sock)
        os.chown(sock, socket_owner, socket_owner, follow_symlinks=False)
        expected = f"belongs to uid {OTHER}" if socket_owner else f"served by process {fake.pid} of uid {OTHER}"
        with pytest.raises(UntrustedFileError, match=expected):
            shared.acquire()
        assert not mark.exists(), "the greeting was never unpickled"
    finally:
        fake.kill()
        fake.wait()
        fake.stdout.close()
        shutil.rmtree(staging)
    shutil.rmtree(directory)


_HOLD_LOCK = """
import fcntl, sys, time
fd = open(sys.argv[1], "a")
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_gc_signals_no_process_it_cannot_prove_is_its_server() -> None:
    from modelshare._owners.server import _STATS, ServerFiles

    directory = Path(tempfile.mkdtemp(prefix="modelshare-test-", dir="/dev/shm"))
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    files = ServerFiles(SharedModel(dict, key="forged", directory=directory).segment_name, 0)
    files.status.write_bytes(_STATS.pack(victim.pid, 0, 0, 0, 0, time.time() - 3600, b"", 0.0))  # idle for an hour
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(files.status)], stdout=subprocess.PIPE, text=True)
    start_holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(files.start)], stdout=subprocess.PIPE,
                                    text=True)
    try:
        assert holder.stdout.readline() == "locked\n" and start_holder.stdout.readline() == "locked\n"
        out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(directory), "gc"], capture_output=True,
                             text=True, timeout=30, cwd=ROOT)  # a start lock held elsewhere: no hang
        assert out.returncode == 0
        start_holder.kill()
        start_holder.wait()
        out = _cli(directory, "gc")  # the start lock free: the status lock's holder is not the pid it names
        assert out.returncode == 0
        time.sleep(0.2)
        assert victim.poll() is None, "gc signalled a process that is not its server"
    finally:
        for proc in (victim, holder, start_holder):
            proc.kill()
            proc.wait()
        for proc in (holder, start_holder):
            proc.stdout.close()
    shutil.rmtree(directory)


def test_a_sigterm_still_reaches_a_real_orphaned_server() -> None:
    from modelshare._owners.server import ServerFiles, sweep_servers

    directory = Path(tempfile.mkdtemp(prefix="modelshare-test-", dir="/dev/shm"))  # short enough for a socket
    shared = SharedModel(dict, key="orphan", share=Server(idle_exit=600), directory=directory)
    with shared.use() as client:
        (pid,) = client.servers()
    deadline = time.monotonic() + 20
    while not sweep_servers(directory, orphaned_after=0.0):  # once it has seen its client go: proven ours, stopped
        assert time.monotonic() < deadline, "the orphaned server was never stopped"
        time.sleep(0.05)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the orphaned server was not stopped")
    assert not ServerFiles(shared.segment_name, 0).alive()
    shutil.rmtree(directory)

