"""The keeper of a GPU copy: a small process that holds the copy's exported memory descriptor and
hands it to every process that wants to map the copy -- without a CUDA context of its own.

The problem it solves: a GPU copy is CUDA VMM memory exported as a file descriptor (``cuda``).
The driver frees it once no descriptor and no mapping is left, so the memory outlives the process
that made it -- but a process that comes later needs a descriptor from someone. The keeper is that
someone. It never touches the GPU (it imports no framework and holds no context, so it costs the
GPU nothing and ``nvidia-smi`` does not list it); it only keeps the descriptor and a list of holders.

Lifetime rules:

* Every process that maps the copy keeps one connection to the keeper open for as long as it
  maps it: the connection *is* its hold. The kernel closes it when the process exits, SIGKILL
  included, so holders need no bookkeeping and cannot go stale.
* The keeper is started by the process that made the copy, which is its first holder (one end of
  a socket pair, handed over at start). When the last holder's connection closes, the keeper
  removes its files and exits; the driver frees the memory once the last mapping is gone too.
* A SIGKILLed keeper leaves its files (``modelshare gc`` removes them); processes already mapping
  the copy keep computing on it, and the next process to ask makes a new copy.

Files, beside the model's segment (see ``_owners.owner``): ``<key>--<version>.gpu-<uuid>.sock``,
``.gpu`` (the status ``modelshare ls`` shows: key, size, creator, holders' pids) and ``.start``.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from .._host.directory import SegmentName
from .._host.trust import read_own, warn_skipped
from .._owners.owner import (
    OwnerFiles,
    connect_own,
    detach,
    launch,
    peer_credentials,
    serve,
)
from ..errors import UntrustedFileError

__all__ = ["DeviceCopyFiles", "DeviceCopyInfo", "start_keeper", "request_copy", "read_status", "list_device_copies",
           "sweep_device_copies"]


@dataclass(frozen=True)
class DeviceCopyFiles(OwnerFiles):
    """Where the keeper of model version ``name``'s copy on the GPU with UUID ``gpu`` keeps its files.

    Copies are named by the physical GPU, not by an index: processes pinned to different GPUs
    with ``CUDA_VISIBLE_DEVICES`` number them differently. ``index`` is this process's number for it.
    """

    gpu: str = ""
    index: int = field(default=0, compare=False)
    STATUS_SUFFIX: ClassVar[str] = ".gpu"
    OWNER_PREFIX: ClassVar[str] = "gpu-"

    @property
    def owner(self) -> str:
        return f"{self.OWNER_PREFIX}{self.gpu[:12]}"

    @classmethod
    def for_owner(cls, name: SegmentName, owner: str) -> Optional["DeviceCopyFiles"]:
        gpu = owner[len(cls.OWNER_PREFIX):]
        return cls(name, gpu) if gpu else None


@dataclass
class DeviceCopyInfo:
    """One GPU copy, as its keeper describes it (what ``modelshare ls`` shows)."""

    key: str
    version: str
    device: str  # as the maker numbered it (cuda:<index>)
    index: int
    uuid: str
    nbytes: int
    keeper: int
    creator: int
    created: float
    read_only: bool = True
    holders: list[int] = field(default_factory=list)
    alive: bool = True


def read_status(files: DeviceCopyFiles) -> Optional[DeviceCopyInfo]:
    """The keeper's status, or None if there is none (yet, or any more)."""
    for _ in range(3):  # the keeper rewrites it in place: a torn read parses on the next try
        try:
            fields = json.loads(read_own(files.status))
        except FileNotFoundError:
            return None
        except ValueError:
            time.sleep(0.001)
            continue
        try:
            return DeviceCopyInfo(**fields, alive=files.alive())
        except TypeError:
            return None  # not a keeper's status
    return None


def list_device_copies(directory: Path) -> list[DeviceCopyInfo]:
    """Every GPU copy with a keeper's files in ``directory``, live or left by a crash."""
    infos = []
    for files in DeviceCopyFiles.find(directory):
        try:
            info = read_status(files)
        except UntrustedFileError as exc:
            warn_skipped(exc)
            continue
        if info is not None:
            infos.append(info)
    return infos


def sweep_device_copies(directory: Path, *, dry_run: bool = False) -> list[Path]:
    """Remove the files of keepers that died (a live keeper leaves by itself with its last holder)."""
    return [path for files in DeviceCopyFiles.find(directory) for path in files.sweep_if_dead(dry_run=dry_run)]


def start_keeper(files: DeviceCopyFiles, memory_fd: int, *, nbytes: int, fingerprint: str, read_only: bool,
                 key: str) -> socket.socket:
    """Start the keeper of the copy behind ``memory_fd`` (start lock held); this process's hold on it.

    The keeper takes over its own duplicate of ``memory_fd``; the caller may close its own.
    """
    here, there = socket.socketpair()
    orders = {"directory": str(files.name.directory), "stem": files.name.stem, "gpu": files.gpu, "index": files.index,
              "nbytes": nbytes, "fingerprint": fingerprint, "read_only": read_only, "key": key,
              "creator": os.getpid(), "memory_fd": memory_fd, "lease_fd": there.fileno()}
    try:
        launch("modelshare._gpu.keeper", json.dumps(orders).encode(), f"the keeper of model {key!r}'s GPU copy",
               files.log, pass_fds=(memory_fd, there.fileno()))
    except BaseException:
        here.close()
        raise
    finally:
        there.close()
    return here


def request_copy(files: DeviceCopyFiles) -> Optional[tuple[socket.socket, dict[str, Any], int]]:
    """Ask the live keeper for its copy: (the hold, what it says of the copy, the memory descriptor),
    or None if no keeper answers. Keep the hold open as long as the copy is mapped."""
    try:
        lease = connect_own(files.sock)  # this uid's socket, served by this uid
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    try:
        hello, fds, _, _ = socket.recv_fds(lease, 4096, 1)
    except ConnectionResetError:
        lease.close()
        return None
    if not hello or not fds:  # the keeper was leaving as we came
        lease.close()
        for fd in fds:
            os.close(fd)
        return None
    return lease, json.loads(hello), fds[0]


class _Keeper:
    """The running keeper: hand the descriptor to each new holder, exit after the last one."""

    def __init__(self, orders: dict[str, Any], files: DeviceCopyFiles, status_fd: int) -> None:
        self.files = files
        self.memory_fd = orders["memory_fd"]
        self.hello = json.dumps({k: orders[k] for k in ("nbytes", "fingerprint", "read_only")}).encode()
        self.status = {"key": orders["key"], "version": files.name.version,
                       "device": f"cuda:{files.index}", "index": files.index, "uuid": files.gpu,
                       "nbytes": orders["nbytes"],
                       "keeper": os.getpid(), "creator": orders["creator"], "created": time.time(),
                       "read_only": orders["read_only"]}
        self.status_fd = status_fd
        self.uid = os.getuid()
        self.selector = selectors.DefaultSelector()
        self.holders: dict[socket.socket, int] = {}
        self._add(socket.socket(fileno=orders["lease_fd"]), orders["creator"])
        self.listener = files.listen()
        self.selector.register(self.listener, selectors.EVENT_READ)

    def _add(self, conn: socket.socket, pid: int) -> None:
        self.holders[conn] = pid
        self.selector.register(conn, selectors.EVENT_READ)
        self._write_status()

    def _drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        conn.close()
        del self.holders[conn]
        self._write_status()

    def _write_status(self) -> None:
        data = json.dumps(dict(self.status, holders=sorted(set(self.holders.values())))).encode()
        os.ftruncate(self.status_fd, 0)
        os.pwrite(self.status_fd, data, 0)

    def _accept(self) -> bool:
        """Take on one waiting connection; whether there was one."""
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return False
        pid, uid = peer_credentials(conn)
        if uid != self.uid:
            conn.close()
            return True
        try:
            socket.send_fds(conn, [self.hello], [self.memory_fd])
        except OSError:
            conn.close()  # gone already
            return True
        self._add(conn, pid)
        return True

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.listener:
                    self._accept()
                    continue
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    closed = not conn.recv(64)
                except OSError:
                    closed = True
                if closed:
                    self._drop(conn)
            if not self.holders and self._leave():
                return

    def _leave(self) -> bool:
        """With no holder left: leave, unless a process connected meanwhile (then serve it)."""
        try:
            with self.files.starting():
                self.listener.setblocking(False)
                came = self._accept()
                self.listener.setblocking(True)
                if came and self.holders:
                    return False
                self.shutdown()
                self.files.remove()
        except OSError:  # its directory is gone (or no longer usable): nobody can reach it, leave
            pass
        return True

    def shutdown(self) -> None:
        """Stop accepting, remove the socket and status; the descriptor goes with the process."""
        self.listener.close()
        self.files.remove_stale()


def main() -> int:
    """Entry point: read the orders (JSON) on stdin, keep the descriptor, serve holders, exit."""
    orders = json.loads(sys.stdin.buffer.read())
    detach()
    files = DeviceCopyFiles(SegmentName(Path(orders["directory"]), orders["stem"]), orders["gpu"], orders["index"])
    keeper = _Keeper(orders, files, files.hold_status())
    return serve(keeper.shutdown, keeper.serve)


if __name__ == "__main__":
    sys.exit(main())
