"""``share="server"``: ``copies`` server processes per machine own the model; this process holds
a client that looks like the model and sends each call to the least busy copy.

For models that cannot be split into weights (native state, a lock, an engine) and for an exact
number of instances per machine. The servers (``_owners.server``) start on first use and leave
``idle_exit`` seconds after their last client; arrays travel through shared memory
(``_owners.wire``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from .. import _process
from .._host import inventory
from .._host.trust import ensure_directory
from . import Hold, HoldInfo, Mode

if TYPE_CHECKING:
    from .._owners.client import ServerClient
    from .._shared import SharedModel

__all__ = ["Server"]


@dataclass(frozen=True)
class Server(Mode):
    """Exactly ``copies`` model instances per machine, each in a server process of its own.

    Args:
        copies: how many server processes (model instances) on the machine; default one per
            entry of ``devices``, else 1.
        devices: the devices the copies go to, round robin (e.g. ``["cuda:0", "cuda:0", "cuda:1"]``);
            a loader with a ``device`` parameter gets its copy's.
        retries: how often a call whose server died runs again on a restarted one.
        idle_exit: seconds a server waits after its last client left before exiting.
        call_timeout: seconds one call may take, else :class:`CallTimeoutError` (its connection is
            dropped; the copy, still busy, gets no new call while another copy is free). None: no limit.

    ``SharedModel(timeout=)`` bounds the start: waiting for a copy to load (the copy is stopped
    then, leaving no process behind).
    """

    copies: Optional[int] = None
    devices: Sequence[str] = ()
    retries: int = 0
    idle_exit: float = 5.0
    call_timeout: Optional[float] = None
    name: ClassVar[str] = "server"

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(str(d) for d in self.devices))
        if self.copies is None:
            object.__setattr__(self, "copies", max(1, len(self.devices)))
        if not isinstance(self.copies, int) or isinstance(self.copies, bool) or self.copies < 1:
            raise ValueError(f"copies must be a positive int (server processes on the machine), not {self.copies!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0 (calls run again after their server died), "
                             f"not {self.retries!r}")
        if not self.idle_exit > 0:
            raise ValueError(f"idle_exit must be a positive number of seconds, not {self.idle_exit!r}")
        if self.call_timeout is not None and not self.call_timeout > 0:
            raise ValueError(f"call_timeout must be a positive number of seconds or None, not {self.call_timeout!r}")

    def check(self, shared: "SharedModel[Any]") -> None:
        if shared.keep_warm:
            raise ValueError("keep_warm= keeps a segment or an instance after its last release; a server stays "
                             "idle_exit seconds after its last client: use Server(idle_exit=...)")
        if shared.codec_option is not None:
            raise ValueError("codec= says how a model is split into a shared segment; a server loads the model "
                             "whole (share='server' takes no codec)")

    def hold(self, shared: "SharedModel[Any]") -> Hold:
        from .._owners.client import ServerClient

        start = time.perf_counter()
        _process.sweep_once(ensure_directory(shared.directory), inventory.sweep_leftovers)
        client = ServerClient(shared, self)
        client.start()
        return _ClientHold(client, HoldInfo(False, time.perf_counter() - start, 0))


class _ClientHold(Hold):
    """This process's client of the model's servers: its connections are its hold."""

    def __init__(self, client: "ServerClient", info: HoldInfo) -> None:
        super().__init__(client, info)
        self.client = client

    def release(self) -> None:
        super().release()
        self.client.close()

    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        self.client.after_fork_in_child()
