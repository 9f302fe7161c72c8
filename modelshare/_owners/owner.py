"""Owner processes: a small process that owns something for one model version on behalf of every
process on the machine -- a server copy (``server``), or the keeper of a GPU copy's memory
(``_gpu.keeper``) -- and the files by which the others find it.

Each owner has three files beside the model's segment, ``<key>--<version>.<owner><suffix>``
(``_host.directory`` makes and reads the names):

* ``.sock``: its Unix socket. The directory is the user's own (mode 0700) and the owner checks
  every connection's peer uid, so only the same user reaches it. The address appears complete or
  not at all (bound under a temporary name, then renamed).
* a status file (``.srv``, ``.gpu``): what ``modelshare ls`` shows. The owner holds an exclusive
  ``flock`` on it for its whole life, so "alive" is a lock test that a SIGKILL cannot fool.
* ``.start``: a lock that serialises starting and stopping the owner: whoever finds no live owner
  starts one under it, and an owner leaving for lack of clients removes its files under it.

An owner is started as ``python -m <module>``, reads its orders on stdin, forks itself away from
the starter (re-parented, its own session: it outlives whoever started it), and says ``ready`` on
stdout once its socket serves; the starter waits for that line, or reports the owner's stderr.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional, Sequence, TypeVar

from .._host.directory import SegmentName, scan
from .._host.locks import lock_file
from ..errors import OwnerStartError, SegmentDirectoryError

Files = TypeVar("Files", bound="OwnerFiles")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_MAX_SOCKET_PATH = 107  # a Unix socket address holds 108 bytes, the terminating NUL included


@dataclass(frozen=True)
class OwnerFiles:
    """Where one owner of model version ``name`` keeps its socket, status file and start lock."""

    name: SegmentName
    STATUS_SUFFIX: ClassVar[str] = ".status"
    OWNER_PREFIX: ClassVar[str] = ""  # what every owner of this kind is called: "copy", "gpu-"

    def __post_init__(self) -> None:
        length = len(os.fsencode(self.sock))
        if length > _MAX_SOCKET_PATH:
            raise SegmentDirectoryError(
                errno.ENAMETOOLONG,
                f"the socket {self.sock} would be {length} bytes long, and Unix sockets allow "
                f"{_MAX_SOCKET_PATH}: use a shorter key, or a shorter segment directory (MODELSHARE_DIR)")

    @property
    def owner(self) -> str:
        """What tells this owner from the model's other owners (``copy0``, ``gpu-<uuid>``)."""
        raise NotImplementedError

    @classmethod
    def for_owner(cls: type[Files], name: SegmentName, owner: str) -> Optional[Files]:
        """The files of the owner called ``owner`` (read back from a file name), if it is of this kind."""
        raise NotImplementedError

    @classmethod
    def find(cls: type[Files], directory: Path) -> list[Files]:
        """Every owner of this kind with any file in ``directory``, alive or left by a crash."""
        found: dict[Files, None] = {}
        for entry in scan(directory):
            if entry.kind == "owner" and entry.owner.startswith(cls.OWNER_PREFIX):
                files = cls.for_owner(entry.name, entry.owner)
                if files is not None:
                    found[files] = None
        return list(found)

    @property
    def sock(self) -> Path:
        return self.name.owner_path(self.owner, ".sock")

    @property
    def status(self) -> Path:
        return self.name.owner_path(self.owner, self.STATUS_SUFFIX)

    @property
    def start(self) -> Path:
        return self.name.owner_path(self.owner, ".start")

    def alive(self) -> bool:
        """Whether an owner holds these files now (its exclusive lock on the status file)."""
        try:
            fd = os.open(self.status, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Hold the start lock: nobody else starts or stops this owner meanwhile. (``lock_file``
        re-checks the inode after locking, so the holder may unlink the file: see ``remove``.)"""
        fd = lock_file(self.start, fcntl.LOCK_EX)
        assert fd is not None
        try:
            yield
        finally:
            os.close(fd)

    def remove(self, *, dry_run: bool = False) -> list[Path]:
        """Remove all of this owner's files (start lock held: as the owner goes, or after it died);
        what was (or, with ``dry_run``, would be) removed."""
        doomed = [p for p in (self.sock, self.status, self.start) if p.exists()]
        if not dry_run:
            self.remove_stale()
            self.start.unlink(missing_ok=True)
        return doomed

    def remove_stale(self) -> None:
        """Remove what a dead owner left (call with the start lock held, after ``alive()`` said no)."""
        self.sock.unlink(missing_ok=True)
        self.status.unlink(missing_ok=True)

    def sweep_if_dead(self, *, dry_run: bool = False) -> list[Path]:
        """Remove this owner's files if it is dead (under its start lock); what was (or would be) removed."""
        with self.starting():
            return [] if self.alive() else self.remove(dry_run=dry_run)

    def hold_status(self) -> int:
        """In the owner: open the status file and lock it for life; the descriptor, or exit if
        another owner holds it already."""
        fd = os.open(self.status, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process owns {self.status} already", file=sys.stderr)
            sys.exit(1)
        return fd

    def listen(self) -> socket.socket:
        """In the owner: bind and listen on ``sock`` (under a temporary name, then renamed)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        temporary = self.sock.with_name(self.sock.name + f".{os.getpid()}")
        listener.bind(str(temporary))
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.sock)
        listener.listen(128)
        return listener


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket, from the kernel."""
    pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def launch(module: str, orders: bytes, what: str, pass_fds: Sequence[int] = ()) -> None:
    """Start ``python -m module`` with ``orders`` on stdin and wait until it prints ``ready``.

    Only ``pass_fds`` are inherited: an owner must not keep the starter's other descriptors (a
    CUDA process's device files would keep its context's memory alive). Raises
    :class:`OwnerStartError` with ``what`` failed to start and the owner's stderr if it exits first.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, close_fds=True, pass_fds=tuple(pass_fds))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(orders)
    proc.stdin.close()
    proc.wait()  # the launcher forks the owner and exits at once
    ready = proc.stdout.readline()
    proc.stdout.close()
    errors = proc.stderr.read().decode(errors="replace") if ready != b"ready\n" else ""
    proc.stderr.close()
    if ready != b"ready\n":
        stderr = errors.strip()[-3000:]
        raise OwnerStartError(f"{what} failed to start:\n{stderr}", stderr)


def detach() -> None:
    """In the owner: leave the starter (which reaps the launcher at once) and its session."""
    if os.fork():
        os._exit(0)
    os.setsid()


def serve(shutdown: Callable[[], None], serve_forever: Callable[[], None]) -> int:
    """In the owner, once it can serve: exit cleanly on SIGTERM (``shutdown`` first), tell the
    starter it is ready, stop writing to the starter's pipes, and serve."""

    def terminate(*_: object) -> None:
        shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, terminate)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    serve_forever()
    return 0
