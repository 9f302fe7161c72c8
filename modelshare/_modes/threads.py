"""``share="threads"``: one instance of the model per process, loaded once even when threads race.

No segment, nothing across processes: the instance lives in this process (for as long as it is
held, or for the life of the process with ``keep_warm``). Beam's default (``Shared``) does this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from . import Hold, HoldInfo, Mode
from .pool import check_instances, instances_of, pooled, rebuilder

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
        model = instances_of(shared, loaded, self.instances)
        rebuild: list[Callable[[], Any]] = []  # made on the first new instance: most holds never ask

        def new_instance() -> Any:
            if not rebuild:
                rebuild.append(rebuilder(shared, loaded))
            return pooled([rebuild[0]() for _ in range(self.instances)])

        hold = Hold(model, HoldInfo(True, time.perf_counter() - start, 0), new_instance)
        hold.stays_loaded = shared.keep_warm
        return hold
