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
copies results out of the arena, so they outlive the next call.
"""

from __future__ import annotations

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
_HEADER = struct.Struct("!IIi")  # pickle length, buffer-table length, 1 if an arena fd follows
_ALIGN = 64


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

    def __init__(self, sock: socket.socket, spin_s: float = 0.0) -> None:
        self.sock = sock
        self.spin_s = spin_s
        self.arena: Optional[Arena] = None  # made by whichever end first sends a large buffer

    def send(self, obj: Any, reserved: int = 0) -> None:
        """Send ``obj``; its large buffers go into the arena after the first ``reserved`` bytes."""
        large: list[pickle.PickleBuffer] = []
        stream = io.BytesIO()
        _Pickler(stream, protocol=5, buffer_callback=lambda b: _keep_inline(b, large)).dump(obj)
        table, offset = [], _aligned(reserved)
        for buffer in large:
            raw = buffer.raw()
            table.append((offset, raw.nbytes))
            offset = _aligned(offset + raw.nbytes)
        new_fd = -1
        if large and (self.arena is None or offset > self.arena.size):
            self._replace_arena(Arena.create(offset))
            new_fd = self.arena.fd
        for buffer, (start, nbytes) in zip(large, table):
            self.arena.map[start : start + nbytes] = buffer.raw()
        table_bytes = pickle.dumps(table, protocol=5) if table else b""
        body = stream.getbuffer()
        header = _HEADER.pack(body.nbytes, len(table_bytes), 1 if new_fd >= 0 else 0)
        parts = [header, table_bytes, body]
        sent = socket.send_fds(self.sock, parts, [new_fd]) if new_fd >= 0 else self.sock.sendmsg(parts)
        if sent < sum(len(p) for p in parts):  # a short write: the rest goes the plain way
            self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def receive(self, copy: bool) -> tuple[Any, int]:
        """The next message (raises ``EOFError`` when the other end is gone), and where its arena
        buffers end. ``copy``: copy arrays out of the arena (else they are views of it)."""
        header, fds = self._receive_header()
        body_len, table_len, has_fd = _HEADER.unpack(header)
        if has_fd:
            if not fds:
                raise EOFError("an arena was announced but no file descriptor came with it")
            arena = Arena(fds[0], os.fstat(fds[0]).st_size)
            self._replace_arena(arena)
        table = pickle.loads(self._receive_exactly(table_len)) if table_len else []
        body = self._receive_exactly(body_len)
        buffers = [(bytearray(self.arena.view(o, n)) if copy else self.arena.view(o, n)) for o, n in table]
        end = _aligned(table[-1][0] + table[-1][1]) if table else 0
        return pickle.loads(body, buffers=buffers), end

    def _receive_header(self) -> tuple[bytes, list[int]]:
        deadline = time.perf_counter() + self.spin_s
        while True:  # poll briefly before sleeping: waking a sleeping process costs ~50-100 us on a VM
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, _HEADER.size, 1, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                if time.perf_counter() > deadline:
                    data, fds, _, _ = socket.recv_fds(self.sock, _HEADER.size, 1)
                    break
        if not data:
            raise EOFError("the other end closed the connection")
        if len(data) < _HEADER.size:
            data += self._receive_exactly(_HEADER.size - len(data))
        return data, fds

    def _receive_exactly(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise EOFError("the other end closed the connection mid-message")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def peer_closed(self) -> bool:
        """Whether the other end has gone (its socket shows end-of-file), without waiting."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
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


def _keep_inline(buffer: pickle.PickleBuffer, large: list[pickle.PickleBuffer]) -> bool:
    if buffer.raw().nbytes < INLINE_MAX:
        return True
    large.append(buffer)
    return False


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN
