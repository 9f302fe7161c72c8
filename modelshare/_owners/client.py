"""The client of ``share="server"``: an object that looks like the model and sends every call to
the least busy of the model's N server copies on this machine.

``client(x)`` and ``client.predict(x)`` become calls on the server (any method name; a plain
attribute comes back as its value). Each thread of a process has its own connection to each
copy, so calls from many threads and processes run in parallel up to the number of copies. The
copy for a call is the one with the fewest calls in flight, read from the servers' status tables
(machine-wide, not per process); ties rotate, so calls spread over the copies.

Faults: a server that dies mid-call is seen at once (its socket closes) and the call raises
:class:`ServerDiedError` -- or, with ``retries``, runs again on a restarted server; the next call
starts a new server. An exception raised by the model is raised here, with the server-side
traceback as its cause.

Fork: a forked child (``os.fork``, a fork-start pool, gunicorn ``--preload``) must never speak on
its parent's connections -- replies would go to whichever process reads first. The client is one
of the process's resources (``_process``): in a child it forgets every inherited connection
without closing it under the parent, and the child's first call opens connections of its own.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from .._host.waiting import Deadline
from .._log import Log
from ..errors import (
    AcquireTimeoutError,
    CallTimeoutError,
    EncodeError,
    LoaderError,
    ModelReleasedError,
    OwnerStartError,
    RemoteError,
    RemoteTraceback,
    ServerDiedError,
)
from .owner import connect_own, launch
from .server import ServerFiles, StatsView, read_stats
from .wire import Channel

if TYPE_CHECKING:
    from .._modes.server import Server

_log = Log(__name__)

__all__ = ["ServerClient"]


class ServerClient:
    """Looks like the model; calls run in the model's server processes (see the module docstring)."""

    def __init__(self, shared: Any, mode: "Server") -> None:
        self._shared = shared
        self._mode = mode
        self._files = [ServerFiles(shared.segment_name, i) for i in range(mode.copies or 1)]
        self._local = threading.local()
        self._all: list[Channel] = []
        self._all_lock = threading.Lock()
        self._rotation = itertools.count()
        self._methods: set[str] = set()
        self._stats: dict[int, StatsView] = {}
        self._stalled: dict[int, float] = {}  # copy -> the call that outlived call_timeout there
        self._closed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call("__call__", *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """A method of the model (called remotely), or the current value of a plain attribute."""
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._methods:
            return functools.partial(self.call, name)
        reply = self._request(("attr", name, (), {}), name)
        if reply[0] == "callable":
            self._methods.add(name)
            return functools.partial(self.call, name)
        return reply[1]

    def __repr__(self) -> str:
        return f"<ServerClient of {self._shared!r}, {len(self._files)} copies>"

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``model.method(*args, **kwargs)`` (``"__call__"``: the model itself) on the least busy copy."""
        reply = self._request(("call", method, args, kwargs), method)
        return reply[1]

    def _request(self, request: tuple[Any, ...], what: str) -> tuple[Any, ...]:
        """Send ``request`` to the least busy copy; its reply, or the model's exception raised here.

        A connection whose call did not complete cleanly -- whatever interrupted it: a signal, a
        ``KeyboardInterrupt``, a timeout, the server's death -- is closed, never reused: its reply
        could still arrive and would answer the next call. Only a lost connection is a dead
        server (``ServerDiedError``, retried ``retries`` times); a call the server never took (it
        was gone already when the call was sent) runs on a new server without counting as a retry.
        Anything else propagates unchanged.
        """
        if self._closed:
            raise ModelReleasedError(f"{self!r} was released; acquire() the model again to call it")
        retries, unsent = self._mode.retries, 0
        while True:
            copy = self._least_busy()
            channel = self._channel(copy)  # its server may have died since: then it never takes this call
            view = self._stats.get(copy)
            taken_before = view.received() if view is not None else None
            try:
                lost = self._exchange(channel, request, what)
            except CallTimeoutError:
                self._forget(copy, channel)
                if view is not None:  # busy until that call ends: calls go elsewhere meanwhile
                    self._stalled[copy] = view.running_since()
                raise
            except BaseException:
                self._forget(copy, channel)
                raise
            if not isinstance(lost, BaseException):
                if lost[0] == "error":
                    raise _remote_exception(lost)
                return lost
            self._forget(copy, channel)
            if taken_before is not None and view is not None and view.received() == taken_before and unsent < 3:
                unsent += 1  # the server never took it: no part of the call ran
                _log.warning("the server of model %r (copy %d) is gone (%s); %s(...) goes to a new one",
                             self._shared.key, copy, lost, what)
                continue
            if retries:
                retries -= 1
                _log.warning("the server of model %r (copy %d) died during %s(...) (%s); running it again on a new "
                             "one (%d retries left)", self._shared.key, copy, what, lost, retries)
                continue
            _log.warning("the server of model %r (copy %d) died during %s(...) (%s)", self._shared.key, copy, what,
                         lost)
            raise ServerDiedError(
                f"the server of model {self._shared.key!r} (copy {copy}) died during {what}(...); "
                "the next call starts a new one (Server(retries=N) retries by itself)"
            ) from lost

    def _exchange(self, channel: Channel, request: tuple[Any, ...], what: str) -> Any:
        """One request and its reply on ``channel``; the exception if the connection was lost."""
        try:
            channel.send(request)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise EncodeError(f"the arguments of {what}(...) cannot be sent to the model's server: "
                              f"{type(exc).__name__}: {exc}; send arrays, tensors or built-in types") from exc
        except (EOFError, ConnectionError) as exc:
            return exc
        call_timeout = self._mode.call_timeout
        start = time.monotonic()
        try:
            reply, _ = channel.receive(copy=True, timeout=call_timeout)
        except (EOFError, ConnectionError) as exc:
            return exc
        except TimeoutError as exc:
            if call_timeout is None or time.monotonic() - start < call_timeout:
                raise  # not ours: a signal handler's, say -- the caller's to handle
            raise CallTimeoutError(
                f"{what}(...) on the server of model {self._shared.key!r} took longer than call_timeout="
                f"{call_timeout:g} s; its connection was dropped, and calls go to other copies while it is busy"
            ) from exc
        return reply

    def start(self) -> None:
        """Connect to every copy now, starting those not running, all at once: the model is ready
        when ``acquire()`` returns, and no later call waits for a copy to load."""
        errors: list[BaseException] = []
        channels: dict[int, Channel] = {}

        def connect(copy: int) -> None:
            try:
                channels[copy] = self._connect(copy)
            except BaseException as exc:  # noqa: BLE001 -- raised below, in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=connect, args=(copy,)) for copy in range(len(self._files))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._local.__dict__.setdefault("channels", {}).update(channels)  # this thread's connections
        with self._all_lock:
            self._all.extend(channels.values())
        if errors:
            raise errors[0]

    def _least_busy(self) -> int:
        """The copy with the fewest calls in flight, machine-wide; among those, the one whose
        running call has run the shortest time (a hung call does not hold calls that could go to
        another copy); ties rotate."""
        if len(self._files) == 1:
            return 0
        loads = []
        for copy in range(len(self._files)):
            view = self._stats.get(copy)
            load = view.load() if view is not None else (0, 0.0)  # not running yet: idle
            stalled = self._stalled.get(copy)
            if stalled is not None and view is not None and view.running_since() == stalled:
                load = (load[0] + len(self._files) * 1_000, load[1])  # still on the call that timed out
            else:
                self._stalled.pop(copy, None)
            loads.append(load)
        low = min(loads)
        candidates = [i for i, load in enumerate(loads) if load == low]
        return candidates[next(self._rotation) % len(candidates)]

    def _channel(self, copy: int) -> Channel:
        channels: dict[int, Channel] = self._local.__dict__.setdefault("channels", {})
        if copy not in channels:
            channels[copy] = self._connect(copy)
            with self._all_lock:
                self._all.append(channels[copy])
        return channels[copy]

    def _forget(self, copy: int, channel: Channel) -> None:
        self._local.__dict__.get("channels", {}).pop(copy, None)
        with self._all_lock:
            if channel in self._all:
                self._all.remove(channel)
        channel.close()

    def _connect(self, copy: int) -> Channel:
        """A connection to ``copy``'s server, starting one if none is running."""
        files = self._files[copy]
        timeout = self._shared.timeout
        deadline = Deadline(timeout)
        starts_left = self._mode.retries + 1  # a server killed while starting is retried like a call
        while True:
            try:
                channel = Channel(connect_own(files.sock))  # this uid's socket, served by this uid
            except (FileNotFoundError, ConnectionRefusedError):
                channel = None
            try:
                if channel is None:
                    raise EOFError
                (_, pid, _), _ = channel.receive(copy=True)  # the hello: this server has taken us on
                with self._all_lock:
                    view = self._stats.get(copy)
                    if view is None or view.pid() != pid:  # a new (or restarted) server: a new table
                        with contextlib.suppress(OSError):
                            self._stats[copy] = StatsView(files.status)
                return channel
            except (EOFError, ConnectionResetError):
                if channel is not None:
                    channel.close()
            if deadline.expired():
                raise AcquireTimeoutError(f"no server for model {self._shared.key!r} (copy {copy}) answered within "
                                          f"{timeout:g} s; see `modelshare ls`")
            with files.starting(deadline=deadline):
                if not files.alive():
                    files.remove_stale()
                    starts_left -= 1
                    try:
                        self._start(copy, deadline)
                    except ServerDiedError:
                        files.remove()
                        if not starts_left:
                            raise
                    except BaseException:
                        files.remove()  # a failed start leaves no files (and launch left no process)
                        raise
                elif not files.sock.exists():
                    deadline.sleep()  # a server exiting right now, or starting: look again

    def _start(self, copy: int, deadline: Deadline) -> None:
        """Start ``copy``'s server and wait until it serves (call with its start lock held). A
        server killed while starting is a :class:`ServerDiedError` (``retries`` apply); one whose
        loader failed a :class:`LoaderError` quoting its output."""
        devices = self._mode.devices
        device = devices[copy % len(devices)] if devices else ""
        what = f"the server for model {self._shared.key!r} (copy {copy})"
        start = time.monotonic()
        try:
            pid = launch("modelshare._owners.server", pickle.dumps((self._shared, copy, device)), what,
                         self._files[copy].log, deadline=deadline)
            _log.info("started %s: pid %d, in %.1f s (its output: %s)", what, pid, time.monotonic() - start,
                      self._files[copy].log)
        except OwnerStartError as exc:
            if exc.died:
                raise ServerDiedError(str(exc)) from None
            raise LoaderError(f"{what} failed to start; its loader or import raised:\n{exc.stderr}") from None

    def close(self) -> None:
        """Close every connection of this process; servers with no client left exit by themselves."""
        self._closed = True
        with self._all_lock:
            channels, self._all = self._all, []
            views, self._stats = list(self._stats.values()), {}
        for channel in channels:
            channel.close()
        for view in views:
            view.close()

    def after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's connections without closing them under it (the
        sockets stay open in the parent: only this process's descriptors close); the child's next
        call connects anew. The status views are read-only mappings, valid in the child too."""
        channels, self._all = self._all, []
        self._local = threading.local()
        self._all_lock = threading.Lock()
        for channel in channels:
            channel.close()  # close(2) of this process's descriptors only: no shutdown, the parent's stay

    def servers(self) -> list[Optional[int]]:
        """The pid serving each copy now, or None where none runs."""
        return [stats.pid if files.alive() and (stats := read_stats(files.status)) else None for files in self._files]


def _remote_exception(reply: tuple[Any, ...]) -> BaseException:
    _, pickled, summary, text = reply
    exc: Optional[BaseException] = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(f"the model raised {summary} (its exception could not be sent back as is)")
    exc.__cause__ = RemoteTraceback(text)
    return exc
