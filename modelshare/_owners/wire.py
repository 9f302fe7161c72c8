"""How a call and its result travel between a client and a model server: one Unix socket per
connection for small messages, and a shared-memory arena for large arrays.

A message is a pickle (protocol 5) sent over the socket behind a 12-byte header. Buffers of at
least ``INLINE_MAX`` bytes (numpy arrays, CPU torch tensors) are not in the pickle: the sender
writes them into the connection's *arena*, a ``memfd`` both ends have mapped, and the message
lists where. When a message needs more room than the arena has, the sender makes a bigger one
and passes its file descriptor along with the message (``SCM_RIGHTS``); both ends then use it.
No file names, nothing to leak: a memfd is freed when the last descriptor and mapping of it go,
whatever was killed.

The receiving server decodes arrays as views of the arena (zero-copy); it writes the result
after the request's buffers, so a result that is a view of an argument stays intact. The client
copies results out of the arena, so they outlive the next call. An arena shrinks again: a
message that needs far less room than the arena has gets a new, smaller one, and a message with
no large buffer lets a large arena go (the header says so); both ends then drop the old one.

Receiving is linear in the message's size whatever it is (a 256 MiB ``bytes`` result included),
and can be bounded in time (``timeout``: a ``TimeoutError``, after which the connection must not
be used again). Before sleeping on a small reply the receiver polls for ``SPIN_S`` -- only while
the machine has an idle core: on a busy one polling would take the very time the other end needs.
"""

from __future__ import annotations

import array
import io
import mmap
import os
import pickle
import socket
import struct
import sys
import time
from typing import Any, Optional

INLINE_MAX = 64 * 1024
_HEADER = struct.Struct("!IIi")  # pickle length, buffer-table length, arena change (below)
_ARENA_KEPT, _ARENA_NEW, _ARENA_DROPPED = 0, 1, 2  # a new arena's fd comes with the message
_SHRINK_ABOVE = 16 << 20  # an arena larger than this, and than 4x what a message needs, is replaced
_FIRST_READ = 256 * 1024
_FDS_SPACE = socket.CMSG_SPACE(4)  # room for one file descriptor
_NOW = int(socket.MSG_DONTWAIT)
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# how long a receiver polls before sleeping: long enough for a small call's round trip
SPIN_S = float(os.environ.get("MODELSHARE_SPIN_US", "100")) / 1e6
_ALIGN = 64


class _IdleCores:
    """Whether the machine had half a core idle over the last ``every`` seconds (``/proc/stat``),
    re-read at most that often: polling pays only where a core would otherwise sit idle."""

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self._next, self._idle, self._last = 0.0, True, self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        """(idle, total) jiffies of the whole machine so far."""
        try:
            with open("/proc/stat", "rb") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return 0, 0
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every
            idle, total = self._cpu_times()
            (last_idle, last_total), self._last = self._last, (idle, total)
            if total > last_total:
                self._idle = (idle - last_idle) / (total - last_total) * (os.cpu_count() or 1) >= 0.5
        return self._idle


_idle_cores = _IdleCores()


class Arena:
    """A shared-memory area (a memfd) mapped by both ends of one connection."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if size else None

    @classmethod
    def create(cls, size: int) -> "Arena":
        size = max(1 << 20, 1 << (size - 1).bit_length())  # powers of two from 1 MiB: few regrowths
        fd = os.memfd_create("modelshare-call", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def view(self, offset: int, nbytes: int) -> memoryview:
        assert self.map is not None
        return memoryview(self.map)[offset : offset + nbytes]

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a caller still holds a view (a server-side argument): the GC unmaps it
                pass
        os.close(self.fd)


def _tensor_from_array(array: Any) -> Any:
    import torch

    return torch.from_numpy(array)


class _Pickler(pickle.Pickler):
    """Pickle protocol 5; CPU torch tensors travel as numpy arrays so their data can go out of band."""

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_sparse:
            try:
                array = obj.detach().contiguous().numpy()
            except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16): pickled the usual way
                return NotImplemented
            return _tensor_from_array, (array,)
        return NotImplemented


class Channel:
    """One end of a connection: send and receive messages, sharing an arena with the other end."""

    def __init__(self, sock: socket.socket, spin_s: float = SPIN_S) -> None:
        self.sock = sock
        self.spin_s = spin_s
        self._pending = b""
        self.arena: Optional[Arena] = None  # made by whichever end first sends a large buffer
        self._stream = io.BytesIO()
        self._large: list[pickle.PickleBuffer] = []
        self._pickler = _Pickler(self._stream, protocol=5, buffer_callback=self._keep_inline)

    def _keep_inline(self, buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < INLINE_MAX:
            return True
        self._large.append(buffer)
        return False

    def send(self, obj: Any, reserved: int = 0) -> None:
        """Send ``obj``; its large buffers go into the arena after the first ``reserved`` bytes."""
        self._stream.seek(0)
        self._stream.truncate()
        self._pickler.clear_memo()
        large = self._large
        large.clear()
        try:
            self._pickler.dump(obj)
            with self._stream.getbuffer() as body:  # no copy of a large in-band payload
                self._send(body, large, reserved)
        finally:
            large.clear()
            self._pickler.clear_memo()  # let go of what was sent

    def _send(self, body: memoryview, large: list[pickle.PickleBuffer], reserved: int) -> None:
        table, offset = [], _aligned(reserved)
        for buffer in large:
            raw = buffer.raw()
            table.append((offset, raw.nbytes))
            offset = _aligned(offset + raw.nbytes)
        change = _ARENA_KEPT
        arena_size = self.arena.size if self.arena is not None else 0
        if large and (offset > arena_size or arena_size > max(4 * offset, _SHRINK_ABOVE)):
            self._replace_arena(Arena.create(offset))
            change = _ARENA_NEW
        elif not large and arena_size > _SHRINK_ABOVE:
            self._replace_arena(None)  # a large arena nothing uses now: both ends let it go
            change = _ARENA_DROPPED
        for buffer, (start, nbytes) in zip(large, table):
            self.arena.map[start : start + nbytes] = buffer.raw()  # type: ignore[union-attr]
        table_bytes = pickle.dumps(table, protocol=5) if table else b""
        header = _HEADER.pack(len(body), len(table_bytes), change)
        parts = [header, table_bytes, body]
        if change == _ARENA_NEW:
            sent = socket.send_fds(self.sock, parts, [self.arena.fd])  # type: ignore[union-attr]
        else:
            sent = self.sock.sendmsg(parts)
        for part in parts:  # a short write: the rest goes the plain way, part by part (no copy of the body)
            if sent >= len(part):
                sent -= len(part)
                continue
            self.sock.sendall(memoryview(part)[sent:])
            sent = 0

    def receive(self, copy: bool, timeout: Optional[float] = None) -> tuple[Any, int]:
        """The next message (raises ``EOFError`` when the other end is gone), and where its arena
        buffers end. ``copy``: copy arrays out of the arena (else they are views of it).
        ``timeout``: seconds to wait at most, else ``TimeoutError`` (the connection is then out of
        step: close it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._receive(copy, deadline)
        finally:
            if deadline is not None:
                self.sock.settimeout(None)

    def _receive(self, copy: bool, deadline: Optional[float]) -> tuple[Any, int]:
        data = self._pending
        fds: list[int] = []
        if len(data) < _HEADER.size:  # one system call brings a small message whole
            chunk, ancillary = self._first_read(deadline)
            if not chunk:
                raise EOFError("the other end closed the connection")
            data += chunk
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % 4]).tolist()
        try:
            if len(data) < _HEADER.size:
                data = self._receive_into(data, _HEADER.size, deadline)
            body_len, table_len, change = _HEADER.unpack_from(data)
            total = _HEADER.size + table_len + body_len
            if len(data) < total:
                data = self._receive_into(data, total, deadline)
            if change == _ARENA_NEW:
                if not fds:
                    raise EOFError("an arena was announced but no file descriptor came with it")
                self._replace_arena(Arena(fds[0], os.fstat(fds[0]).st_size))
                fds = fds[1:]
            elif change == _ARENA_DROPPED:
                self._replace_arena(None)
        finally:
            for fd in fds:  # none expected: never leak one
                os.close(fd)
        self._pending = bytes(data[total:])
        message = memoryview(data)
        table = pickle.loads(message[_HEADER.size : _HEADER.size + table_len]) if table_len else []
        body = message[_HEADER.size + table_len : total]
        buffers = [(bytearray(self.arena.view(o, n)) if copy else self.arena.view(o, n))  # type: ignore[union-attr]
                   for o, n in table]
        end = _aligned(table[-1][0] + table[-1][1]) if table else 0
        return pickle.loads(body, buffers=buffers), end

    def _wait_at_most(self, deadline: Optional[float]) -> None:
        """The socket's blocking reads end at ``deadline`` (``TimeoutError``)."""
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the other end did not answer in time")
            self.sock.settimeout(remaining)

    def _first_read(self, deadline: Optional[float]) -> tuple[bytes, list[Any]]:
        """The first bytes of the next message; polls for up to ``spin_s`` before sleeping, while
        the machine has an idle core: on a virtual machine waking a sleeping vCPU costs ~30 us each
        way, more than a small call's work -- but polling on a busy machine costs more than that."""
        if self.spin_s and _idle_cores():
            until = time.perf_counter() + self.spin_s
            while True:
                try:
                    chunk, ancillary, _, _ = self.sock.recvmsg(_FIRST_READ, _FDS_SPACE, _NOW)
                    return chunk, ancillary
                except BlockingIOError:
                    if time.perf_counter() > until:
                        break
        self._wait_at_most(deadline)
        chunk, ancillary, _, _ = self.sock.recvmsg(_FIRST_READ, _FDS_SPACE)
        return chunk, ancillary

    def _receive_into(self, data: bytes, total: int, deadline: Optional[float]) -> bytearray:
        """``data`` completed to ``total`` bytes (or more, never past the next message's start):
        received straight into one buffer, so any size costs linear time."""
        buffer = bytearray(total)
        buffer[: len(data)] = data
        view, got = memoryview(buffer), len(data)
        while got < total:
            self._wait_at_most(deadline)
            n = self.sock.recv_into(view[got:], total - got)
            if n == 0:
                raise EOFError("the other end closed the connection mid-message")
            got += n
        return buffer

    def peer_closed(self) -> bool:
        """Whether the other end has gone (its socket shows end-of-file), without waiting."""
        try:
            return self.sock.recv(1, _PEEK_NOW) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _replace_arena(self, arena: Optional[Arena]) -> None:
        old, self.arena = self.arena, arena
        if old is not None:
            old.close()

    def close(self) -> None:
        self._replace_arena(None)
        self.sock.close()


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN
