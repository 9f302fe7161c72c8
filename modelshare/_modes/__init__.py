"""How a ``SharedModel`` is shared: a *mode* turns it into a model this process holds.

Three modes, each a small frozen options object, public as ``modelshare.Threads``,
``modelshare.Processes`` and ``modelshare.Server`` (``share="threads"`` is ``Threads()``, and so on):

* ``Threads(instances=1)`` (``threads``): one instance per process, loaded once even when threads race;
* ``Processes(instances=1, device=None, gpu_budget=None)`` (``processes``): one copy of the weights
  per machine in a segment, zero-copy views in every process, and one copy per GPU with ``device``;
* ``Server(copies=1, devices=(), retries=0, idle_exit=5.0)`` (``server``): ``copies`` server
  processes per machine own the model; the process holds a client that looks like the model.

Every option belongs to one mode, so none means two things. ``Mode.hold(shared)`` loads, attaches
or connects and returns a :class:`Hold`: the model, how it came (:class:`HoldInfo`), and how to give
it back. A hold is one of the process's resources (``_process``): what a fork or the exit does to it
is said once, next to what it holds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from .. import _process

if TYPE_CHECKING:
    from .._shared import SharedModel

__all__ = ["HoldInfo", "Hold", "Mode"]


@dataclass(frozen=True)
class HoldInfo:
    """How this process got the model it holds: for metrics (loads vs. attaches, latency, bytes)."""

    loaded_here: bool  # this process ran the loader (else it attached to another's segment or server)
    seconds: float  # how long the acquire that brought the model into this process took
    shared_bytes: int  # size of the segment this process maps (0 unless share="processes")
    device_bytes: int = 0  # size of the GPU copy this process maps (Processes(device="cuda:N"))


class Hold(_process.Resource):
    """What this process holds for one model: ``model`` (what ``acquire()`` hands out), ``info``,
    and what ``release()`` gives back. Models are released first at exit (stage 0)."""

    exit_stage = 0
    #: the model stays in this process after its last release (``Threads`` with ``keep_warm``)
    stays_loaded: bool = False
    #: ``SharedModel.refresh()`` left this version behind: let go at the last release, kept warm or not
    retired: bool = False

    def __init__(self, model: Any, info: HoldInfo, rebuild: Optional[Callable[[], Any]] = None) -> None:
        self.model = model
        self.info = info
        self._rebuild = rebuild

    def new_instance(self) -> Any:
        """Another instance of the model over what this hold holds: its own Python objects and
        state, the same weights (``SharedModel.instance``)."""
        if self._rebuild is None:
            raise TypeError("share='server': the model lives in the server processes, one instance per copy for "
                            "every process; for more instances use Server(copies=N), or another key")
        return self._rebuild()

    def release(self) -> None:
        """Give back what this process holds for the model (the model object is dropped first, so
        that memory nothing else references can go at once)."""
        self.model = self._rebuild = None

    def release_at_exit(self) -> None:
        self.release()

    def after_fork_in_child(self) -> None:
        """A forked child inherits the model; it did not run the loader."""
        self.info = replace(self.info, loaded_here=False)


class Mode(abc.ABC):
    """How a SharedModel is shared (see the module docstring)."""

    name: ClassVar[str]

    def check(self, shared: "SharedModel[Any]") -> None:
        """Raise ``ValueError`` naming any option of ``shared`` that this mode does not take."""

    def ident(self, shared: "SharedModel[Any]") -> tuple[str, ...]:
        """What names the model in this process: copies of one SharedModel meet on it."""
        return (self.name, str(shared.directory), shared.segment_name.stem)

    @abc.abstractmethod
    def hold(self, shared: "SharedModel[Any]") -> Hold:
        """Bring ``shared``'s model into this process: load, attach or connect."""

    def holders(self, shared: "SharedModel[Any]") -> list[int]:
        """Pids of the processes on this machine that hold the model now (where the mode knows)."""
        return []
