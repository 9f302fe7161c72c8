"""The model server: one process that owns one copy of a model and runs the calls clients send it.

For models that cannot be split into weights (a GPU engine, native state, an object holding a
handle) and for an exact number of instances per machine. ``SharedModel(share=Server(
copies=N))`` runs N of these per model version, each started on first use by whichever client
needs it (``python -m modelshare._owners.server``, handed the pickled SharedModel on stdin):

* Files, beside the model's segments, per copy ``i``: ``<key>--<version>.copy<i>.sock`` (the
  socket; the directory is the user's own, mode 0700, and every connection's peer uid is
  checked), ``.copy<i>.srv`` (a tiny status table clients read to pick the least busy copy; the
  server holds an exclusive ``flock`` on it for its life, so "alive" is a lock test),
  ``.copy<i>.log`` (its stdout and stderr: whatever the loader or the model prints) and
  ``.copy<i>.start`` (a lock that serialises starting and stopping the copy).
* Calls on one copy run one at a time (a model is not assumed thread-safe); copies run in
  parallel. With torch loaded, calls run under ``torch.no_grad()``.
* An exception in the model goes back to the caller with its traceback. A client that dies
  mid-call costs nothing: its connection closes and its arena is freed with it.
* When its last client disconnects the server waits ``idle_exit`` seconds and, if none came,
  removes its files and exits. A SIGKILLed server leaves its files; the next start (or
  ``modelshare gc``) removes them.
"""

from __future__ import annotations

import contextlib
import inspect
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

import psutil

from .._host.directory import SegmentName
from .._host.locks import lock_holders
from .._host.trust import open_own, read_own, warn_skipped
from ..errors import UntrustedFileError
from .owner import OwnerFiles, detach, failed, peer_credentials, serve
from .wire import Channel

# pid, copy, clients, in flight, calls served, started, device, when the running call started (0: none)
_STATS = struct.Struct("=qiiiqd32sd")


@dataclass(frozen=True)
class ServerFiles(OwnerFiles):
    """Where copy ``copy`` of one model version keeps its socket, status table (``.srv``) and start lock."""

    copy: int = 0
    STATUS_SUFFIX: ClassVar[str] = ".srv"
    OWNER_PREFIX: ClassVar[str] = "copy"

    @property
    def owner(self) -> str:
        return f"{self.OWNER_PREFIX}{self.copy}"

    @classmethod
    def for_owner(cls, name: SegmentName, owner: str) -> Optional["ServerFiles"]:
        number = owner[len(cls.OWNER_PREFIX):]
        return cls(name, int(number)) if number.isdigit() else None


@dataclass
class ServerStats:
    """One row of a server's status table."""

    pid: int
    copy: int
    clients: int
    in_flight: int
    calls: int
    started: float
    device: str


class StatsView:
    """A live, read-only view of one server's status table (for picking the least busy copy)."""

    def __init__(self, path: Path) -> None:
        fd = open_own(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, _STATS.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def in_flight(self) -> int:
        return _STATS.unpack_from(self._map)[3]

    def load(self) -> tuple[int, float]:
        """(calls in flight, how long the running one has run): what makes a copy busy."""
        fields = _STATS.unpack_from(self._map)
        return fields[3], time.time() - fields[7] if fields[7] else 0.0

    def running_since(self) -> float:
        """When the call running now started (0: none): which call it is."""
        return _STATS.unpack_from(self._map)[7]

    def received(self) -> int:
        """Calls this server has taken so far (served or running): unchanged across a failed call
        means the server never took it."""
        fields = _STATS.unpack_from(self._map)
        return fields[3] + fields[4]

    def pid(self) -> int:
        return _STATS.unpack_from(self._map)[0]

    def close(self) -> None:
        self._map.close()


def read_stats(path: Path) -> Optional[ServerStats]:
    """The status table at ``path``, or None if there is none (yet, or any more)."""
    try:
        data = read_own(path, _STATS.size)
    except OSError:  # none, or not this uid's (UntrustedFileError is a PermissionError)
        return None
    if len(data) < _STATS.size:
        return None
    pid, copy, clients, in_flight, calls, started, device, _running = _STATS.unpack(data)
    return ServerStats(pid, copy, clients, in_flight, calls, started, device.rstrip(b"\0").decode())


@dataclass
class ServerInfo:
    """What ``modelshare ls`` shows about one server copy."""

    key: str
    version: str
    copy: int
    pid: int
    alive: bool
    device: str
    clients: int
    in_flight: int
    calls: int
    started: float


def list_servers(directory: Path) -> list[ServerInfo]:
    """Every server copy with files in ``directory``, alive or left by a crash."""
    infos = []
    for files in ServerFiles.find(directory):
        stats = read_stats(files.status)
        if stats is None:
            continue
        infos.append(ServerInfo(files.name.key, files.name.version, files.copy, stats.pid, files.alive(), stats.device,
                                stats.clients, stats.in_flight, stats.calls, stats.started))
    return infos


def sweep_servers(directory: Path, *, orphaned_after: float = 60.0, dry_run: bool = False) -> list[Path]:
    """Remove the files of dead servers, and stop live ones that have had no client for a while
    (a server exits by itself when idle; this reaps one that could not). Returns what was removed.

    Never waits on a start lock someone holds (that copy is left for the next sweep), never reads
    or removes files that are not this uid's, and signals a pid only once it is proven to be this
    uid's server of that copy (:func:`_is_server_of`)."""
    removed: list[Path] = []
    for files in ServerFiles.find(directory):
        try:
            with files.starting(wait=False) as locked:
                if not locked:
                    continue  # starting or stopping right now
                stats = read_stats(files.status)
                if files.alive():
                    if stats is None or stats.clients or time.time() - stats.started < orphaned_after:
                        continue
                    if not _is_server_of(files, stats):
                        continue  # whatever holds the status lock, it is not a server to stop
                    if not dry_run:
                        os.kill(stats.pid, signal.SIGTERM)  # its handler removes its socket and table
                removed += files.remove(dry_run=dry_run)
        except UntrustedFileError as exc:
            warn_skipped(exc)
    return removed


def _is_server_of(files: ServerFiles, stats: ServerStats) -> bool:
    """Whether ``stats.pid`` is this uid's model server for ``files``: it holds the copy's status
    lock, runs ``python -m modelshare._owners.server`` as this uid, and was started before it wrote
    the status table (a reused pid was not)."""
    try:
        process = psutil.Process(stats.pid)
        return (stats.pid in lock_holders(files.status) and process.uids().real == os.getuid()
                and process.cmdline()[1:3] == ["-m", __name__] and process.create_time() <= stats.started + 1.0)
    except (psutil.Error, IndexError):
        return False


class _Server:
    """The running server: accept connections, run calls one at a time, exit when idle."""

    def __init__(self, model: Any, files: ServerFiles, device: str, idle_exit: float, stats_fd: int) -> None:
        self.model = model
        self.files = files
        self.idle_exit = idle_exit
        self.call_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.exit_lock = threading.Lock()
        self.closing = False
        self.clients = 0
        self.in_flight = 0
        self.running_since = 0.0
        self.calls = 0
        self.started = time.time()
        self.idle_since = time.monotonic()
        self.device = device
        self.device_bytes = device.encode()[:32]
        self.pid = os.getpid()
        os.ftruncate(stats_fd, _STATS.size)
        self.stats = mmap.mmap(stats_fd, _STATS.size)
        self._write_stats()
        self.listener = files.listen()

    def _write_stats(self) -> None:
        _STATS.pack_into(self.stats, 0, self.pid, self.files.copy, self.clients, self.in_flight, self.calls,
                         self.started, self.device_bytes, self.running_since)

    def serve_forever(self) -> None:
        uid = os.getuid()
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed: exiting
            peer_uid = peer_credentials(conn)[1]
            with self.state_lock:
                if self.closing or peer_uid != uid:
                    conn.close()
                    continue
                self.clients += 1
                self._write_stats()
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        channel = Channel(conn)
        try:
            channel.send(("hello", os.getpid(), self.files.copy))
            while True:
                try:
                    request, end = channel.receive(copy=False)
                except (EOFError, OSError):
                    return
                except Exception as exc:  # noqa: BLE001 -- the message was whole; its pickle did not load here
                    channel.send(_error_reply(TypeError(
                        f"the server of this model could not unpickle the call's arguments ({type(exc).__name__}: "
                        f"{exc}); send what its process can import (arrays, tensors, built-in types)")))
                    continue
                with self.state_lock:
                    self.in_flight += 1
                    self._write_stats()
                try:
                    reply = self._run(request)
                finally:
                    with self.state_lock:
                        self.in_flight -= 1
                        self.calls += 1
                        self._write_stats()
                try:
                    channel.send(reply, reserved=end)
                except Exception as exc:  # an unpicklable result: say so instead of hanging the caller
                    if isinstance(exc, OSError):
                        return  # the client is gone
                    channel.send(_error_reply(TypeError(f"the model's result cannot be sent back: {exc}")))
        finally:
            channel.close()
            with self.state_lock:
                self.clients -= 1
                self._write_stats()
                idle = self.clients == 0
                self.idle_since = time.monotonic()
            if idle:
                threading.Timer(self.idle_exit, self._exit_if_idle).start()

    def _run(self, request: Any) -> Any:
        kind, method, args, kwargs = request
        try:
            target = self.model if method == "__call__" else getattr(self.model, method)
            if kind == "attr":
                return ("callable", None) if callable(target) else ("ok", target)
            with self.call_lock, _no_grad():
                self._running(time.time())
                try:
                    return ("ok", target(*args, **kwargs))
                finally:
                    self._running(0.0)
        except BaseException as exc:  # noqa: BLE001 -- every failure goes back to the caller
            return _error_reply(exc)

    def _running(self, since: float) -> None:
        """Publish when the running call started (0: none), so clients steer around a hung copy."""
        with self.state_lock:
            self.running_since = since
            self._write_stats()

    def _exit_if_idle(self) -> None:
        """Leave if no client came for ``idle_exit`` seconds: remove this copy's files and exit.

        One idle timer at a time (``exit_lock``): a second timer that took the start lock after the
        first had unlinked its file would create the file anew, and the process would exit leaving it."""
        try:
            with self.exit_lock, self.files.starting():
                with self.state_lock:
                    if self.clients or self.closing or time.monotonic() - self.idle_since < self.idle_exit * 0.99:
                        return  # a client came (and maybe went: its own timer decides)
                    self.closing = True
                self.shutdown()
                self.files.remove()
                os._exit(0)  # holding both locks: no other timer of this process gets to the start file
        except OSError:  # its directory is gone (or no longer usable): nobody can reach it, leave
            pass
        os._exit(0)

    def shutdown(self) -> None:
        """Stop accepting and remove this copy's files (the start lock held by the caller, or exiting)."""
        self.listener.close()
        self.files.remove_stale()


def _error_reply(exc: BaseException) -> tuple[str, Optional[bytes], str, str]:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        exc.__traceback__ = None
        pickled: Optional[bytes] = pickle.dumps(exc)
        pickle.loads(pickled)
    except Exception:
        pickled = None
    return ("error", pickled, f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}", text)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    torch = sys.modules.get("torch")
    if torch is None:
        yield
    else:
        with torch.no_grad():
            yield


def _share_cores(copies: int) -> None:
    """N copies computing at once on one machine: each takes cores ÷ N intra-op threads (the
    frameworks' pools read these when they start; none has started yet)."""
    threads = str(max(1, (os.cpu_count() or 1) // copies))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, threads)


def _load(shared: Any, device: str) -> Any:
    loader = shared._loader_function()
    try:
        takes_device = "device" in inspect.signature(loader).parameters
    except (TypeError, ValueError):
        takes_device = False
    return loader(device=device) if takes_device else loader()


def main() -> int:
    """Entry point: read (SharedModel, copy, device) from stdin, load, serve."""
    shared, copy, device = pickle.loads(sys.stdin.buffer.read())
    detach()
    files = ServerFiles(shared.segment_name, copy)
    stats_fd = files.hold_status()
    if device:
        os.environ["MODELSHARE_DEVICE"] = device
    _share_cores(shared.mode.copies)
    try:
        model = _load(shared, device)
    except BaseException:
        files.status.unlink(missing_ok=True)
        traceback.print_exc()
        return failed()
    server = _Server(model, files, device, shared.mode.idle_exit, stats_fd)
    return serve(server.shutdown, server.serve_forever)


if __name__ == "__main__":
    sys.exit(main())
