"""``share="threads"``: one instance of the model per process, loaded once even when threads race.

No segment, nothing across processes: the instance lives in this process (for as long as it is
held, or for the life of the process with ``keep_warm``). Beam's default (``Shared``) does this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from . import Hold, HoldInfo, Mode
from .pool import check_instances, pooled, rebuilder

if TYPE_CHECKING:
    from .._shared import SharedModel

__all__ = ["Threads"]


@dataclass(frozen=True)
class Threads(Mode):
    """One instance per process, shared by its threads.

    ``instances``: N instances in the process (an ``InstancePool``: each call on a free one), for
    models that are not thread-safe; rebuilt over the first one's buffers where its codec can.
    """

    instances: int = 1
    name: ClassVar[str] = "threads"

    def __post_init__(self) -> None:
        check_instances(self.instances)

    def ident(self, shared: "SharedModel[Any]") -> tuple[str, ...]:
        return (self.name, shared.key, shared.version_hash)

    def hold(self, shared: "SharedModel[Any]") -> Hold:
        start = time.perf_counter()
        loaded = shared._load()
        hold = _LoadedHold(shared, loaded, self.instances, HoldInfo(True, time.perf_counter() - start, 0))
        hold.stays_loaded = shared.keep_warm
        return hold


class _LoadedHold(Hold):
    """The model this process loaded goes to whoever asks first -- ``acquire()`` or an
    ``instance()`` -- so that one user costs one load; every later instance is rebuilt over its
    buffers where its codec can (else loaded again: one load per instance, as without modelshare).
    An ``instance()`` that takes it encodes it first, so later instances start from the state it
    was loaded in, not from what that instance did with it."""

    def __init__(self, shared: "SharedModel[Any]", loaded: Any, count: int, info: HoldInfo) -> None:
        super().__init__(None, info, self._instance)
        self._shared, self._spare, self._count = shared, loaded, count
        self._template: Optional[Callable[[], Any]] = None
        self._first: Any = None  # the loaded model, where acquire() took it

    @property  # type: ignore[override]
    def model(self) -> Any:
        """What acquire() hands out: the same object every time, made on the first acquire."""
        if self._acquired is None and self._rebuild is not None:
            self._acquired = pooled([self._take(pristine=False) for _ in range(self._count)])
        return self._acquired

    @model.setter
    def model(self, model: Any) -> None:
        self._acquired = model
        if model is None:
            self._spare = self._first = self._template = self._shared = None

    def _instance(self) -> Any:
        return pooled([self._take(pristine=True) for _ in range(self._count)])

    def _take(self, pristine: bool) -> Any:
        """The loaded model if nobody took it yet, else one rebuilt from the first taken."""
        if self._spare is not None:
            spare, self._spare = self._spare, None
            if pristine:
                self._template = rebuilder(self._shared, spare)
            else:
                self._first = spare
            return spare
        if self._template is None:
            self._template = rebuilder(self._shared, self._first)
        return self._template()
