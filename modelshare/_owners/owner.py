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
import select
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
from .._host.trust import check_own, open_own, read_own, warn_skipped
from .._host.waiting import Deadline
from ..errors import (
    AcquireTimeoutError,
    OwnerStartError,
    SegmentDirectoryError,
    UntrustedFileError,
)

Files = TypeVar("Files", bound="OwnerFiles")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_MAX_SOCKET_PATH = 107  # a Unix socket address holds 108 bytes, the terminating NUL included
_BINDING_SUFFIX = 8  # ".<pid>": a dot and up to 7 digits (pid_max is at most 4194304)


@dataclass(frozen=True)
class OwnerFiles:
    """Where one owner of model version ``name`` keeps its socket, status file and start lock."""

    name: SegmentName
    STATUS_SUFFIX: ClassVar[str] = ".status"
    OWNER_PREFIX: ClassVar[str] = ""  # what every owner of this kind is called: "copy", "gpu-"

    def __post_init__(self) -> None:
        length = len(os.fsencode(self.sock)) + _BINDING_SUFFIX  # bound as <sock>.<pid> first (see listen)
        if length > _MAX_SOCKET_PATH:
            raise SegmentDirectoryError(
                errno.ENAMETOOLONG,
                f"the socket {self.sock} needs {length} bytes (with the suffix it is bound under first), and "
                f"Unix sockets allow {_MAX_SOCKET_PATH}: use a shorter key, or a shorter segment directory "
                "(MODELSHARE_DIR)")

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
                try:
                    files = cls.for_owner(entry.name, entry.owner)
                except SegmentDirectoryError:
                    continue  # a socket path no owner could have bound: not one of ours
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

    @property
    def log(self) -> Path:
        """The owner's stdout and stderr (its loader's output)."""
        return self.name.owner_path(self.owner, ".log")

    def alive(self) -> bool:
        """Whether an owner holds these files now (its exclusive lock on the status file). A status
        file that is not this uid's regular file raises :class:`UntrustedFileError`."""
        try:
            fd = open_own(self.status, os.O_RDONLY)
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
    def starting(self, *, wait: bool = True, deadline: Optional[Deadline] = None) -> Iterator[bool]:
        """Hold the start lock: nobody else starts or stops this owner meanwhile. (``lock_file``
        re-checks the inode after locking, so the holder may unlink the file: see ``remove``.)
        ``wait=False``: yields False at once if someone holds it (a sweep never waits on it);
        ``deadline``: wait until then at most (:class:`AcquireTimeoutError`)."""

        def timed_out() -> AcquireTimeoutError:
            return AcquireTimeoutError(f"waited {deadline.seconds:g} s for another process starting or stopping "
                                       f"the owner at {self.start}; raise timeout=")

        fd = lock_file(self.start, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB, deadline, timed_out)
        if fd is None and wait:
            raise SegmentDirectoryError(errno.ENOENT, f"the segment directory {self.name.directory} is gone (removed "
                                        "while in use); nothing can be started or stopped there")
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def remove(self, *, dry_run: bool = False) -> list[Path]:
        """Remove all of this owner's files (start lock held: as the owner goes, or after it died);
        what was (or, with ``dry_run``, would be) removed."""
        doomed = [p for p in (self.sock, self.status, self.log, self.start) if p.exists()]
        if not dry_run:
            self.remove_stale()
            self.start.unlink(missing_ok=True)
        return doomed

    def remove_stale(self) -> None:
        """Remove what a dead owner left (call with the start lock held, after ``alive()`` said no)."""
        self.sock.unlink(missing_ok=True)
        self.status.unlink(missing_ok=True)
        self.log.unlink(missing_ok=True)

    def sweep_if_dead(self, *, dry_run: bool = False) -> list[Path]:
        """Remove this owner's files if it is dead (under its start lock, if nobody holds it: a
        sweep never waits); what was (or would be) removed. Files that are not this uid's regular
        files are left alone, with a warning."""
        try:
            with self.starting(wait=False) as locked:
                return [] if not locked or self.alive() else self.remove(dry_run=dry_run)
        except UntrustedFileError as exc:
            warn_skipped(exc)
            return []

    def hold_status(self) -> int:
        """In the owner: open the status file and lock it for life; the descriptor, or exit if
        another owner holds it already."""
        fd = open_own(self.status, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another process owns {self.status} already", file=sys.stderr)
            sys.exit(failed())
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


def connect_own(path: Path) -> socket.socket:
    """A connection to the owner listening at ``path`` -- only if the socket file is this uid's and
    the process serving it is this uid's (``SO_PEERCRED``, before a byte is read); else
    :class:`UntrustedFileError`. FileNotFoundError / ConnectionRefusedError pass through."""
    check_own(os.lstat(path), path, "a socket")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        pid, uid = peer_credentials(conn)
        if uid != os.getuid():
            raise UntrustedFileError(f"the socket {path} is served by process {pid} of uid {uid}, not by this user "
                                     f"({os.getuid()}): nothing is read from it; remove it if it is not yours")
    except BaseException:
        conn.close()
        raise
    return conn


_START_FD = "MODELSHARE_START_FD"  # the pipe on which an owner reports its pid, then "ready" or "failed"
_LOG_TAIL = 4000


def launch(module: str, orders: bytes, what: str, log: Path, pass_fds: Sequence[int] = (),
           deadline: Optional[Deadline] = None) -> int:
    """Start ``python -m module`` with ``orders`` on stdin; wait until it reports ``ready``; its pid.

    The owner reports on a pipe of its own, never on stdout: its stdout and stderr (the loader's
    prints, warnings, tracebacks) go to ``log``, beside its files, so no output can break or block
    the start. Only ``pass_fds`` are inherited: an owner must not keep the starter's other
    descriptors (a CUDA process's device files would keep its context's memory alive).

    Raises :class:`OwnerStartError` quoting the log's tail if the owner exits first (``died``:
    killed, not failed), or :class:`AcquireTimeoutError` at ``deadline`` -- the owner is then
    stopped, so a failed start leaves no process behind.
    """
    read_fd, write_fd = os.pipe()
    log_fd = open_own(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), PYTHONUNBUFFERED="1",
               **{_START_FD: str(write_fd)})  # unbuffered: the log is in order, and whole if the owner is killed
    try:
        proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=log_fd, stderr=log_fd,
                                env=env, close_fds=True, pass_fds=(*pass_fds, write_fd))
    finally:
        os.close(write_fd)
        os.close(log_fd)
    try:
        assert proc.stdin is not None
        proc.stdin.write(orders)
        proc.stdin.close()
        proc.wait()  # the launcher forks the owner and exits at once
        return _await_ready(read_fd, what, log, deadline or Deadline(None))
    finally:
        os.close(read_fd)


def _await_ready(read_fd: int, what: str, log: Path, deadline: Deadline) -> int:
    """Read the owner's report until ``ready``; its pid."""
    report, pid = b"", 0
    while True:
        remaining = deadline.remaining()
        readable, _, _ = select.select([read_fd], [], [], remaining)
        if not readable:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AcquireTimeoutError(f"{what} did not start within {deadline.seconds:g} s (it was stopped); raise "
                                      f"timeout= if its loader needs longer. Its output:\n{_tail(log)}")
        chunk = os.read(read_fd, 4096)
        report += chunk
        lines = report.decode(errors="replace").split("\n")
        for line in lines:
            if line.startswith("pid "):
                pid = int(line[4:])
        if "ready" in lines:
            return pid
        if chunk and "failed" not in lines:
            continue
        output = _tail(log)  # the owner failed, or is gone without a word
        died = "failed" not in lines and "Traceback" not in output
        why = "died while starting (killed?)" if died else "failed to start"
        raise OwnerStartError(f"{what} {why}; its output:\n{output}", output, died=died)


def _tail(log: Path) -> str:
    try:
        data = read_own(log, 1 << 30)
    except OSError:
        return ""
    return data[-_LOG_TAIL:].decode(errors="replace").strip()


def _report(line: str) -> None:
    """In the owner: tell the starter ``line`` on the start pipe."""
    fd = os.environ.get(_START_FD)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(int(fd), f"{line}\n".encode())


def detach() -> None:
    """In the owner: leave the starter (which reaps the launcher at once) and its session; report
    the pid the owner now runs as."""
    if os.fork():
        os._exit(0)
    os.setsid()
    _report(f"pid {os.getpid()}")


def failed() -> int:
    """In the owner: its start failed (its traceback is in the log); the exit status."""
    _report("failed")
    return 1


def serve(shutdown: Callable[[], None], serve_forever: Callable[[], None]) -> int:
    """In the owner, once it can serve: exit cleanly on SIGTERM (``shutdown`` first), tell the
    starter it is ready, close the start pipe and stdin, and serve (stdout and stderr stay the log)."""

    def terminate(*_: object) -> None:
        shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, terminate)
    _report("ready")
    fd = os.environ.pop(_START_FD, None)
    if fd is not None:
        os.close(int(fd))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    serve_forever()
    return 0
