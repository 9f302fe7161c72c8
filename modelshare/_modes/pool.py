"""InstancePool: N instances of one model in a process, each call on a free one.

For models that are not thread-safe (a tokenizer with state, a session that serialises its own
calls): ``SharedModel(loader, share=Threads(instances=N) | Processes(instances=N)).acquire()``
returns a pool of N instances that share one copy of the weights where the codec allows --
decoded N times over the same segment (``Processes``) or over the loaded model's own buffers
(``Threads``) -- and are loaded N times where it does not. The pool looks like the model: ``pool(x)`` and
``pool.predict(x)`` run on a free instance (waiting for one if all are busy); ``pool.instance()``
lends one for several calls.
"""

from __future__ import annotations

import contextlib
import functools
import queue
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..codecs import SegmentBuffers

if TYPE_CHECKING:
    from .._shared import SharedModel

__all__ = ["InstancePool", "check_instances", "pooled", "rebuilder"]


def check_instances(instances: object) -> None:
    if not isinstance(instances, int) or isinstance(instances, bool) or instances < 1:
        raise ValueError(f"instances must be a positive int (model instances in each process), not {instances!r}")


def pooled(instances: Sequence[Any]) -> Any:
    """The one instance itself, or a pool of several."""
    return instances[0] if len(instances) == 1 else InstancePool(instances)


def rebuilder(shared: "SharedModel[Any]", model: Any) -> Callable[[], Any]:
    """How to make another instance of a loaded ``model``: rebuilt over its own buffers where its
    codec can (the weights stay one copy), else loaded again."""
    try:
        codec = shared._codec_for(model)
        encoded = codec.encode(model)
    except Exception:
        return shared._load  # this codec cannot: every instance is a load of its own
    skeleton, buffers = memoryview(encoded.skeleton), SegmentBuffers(encoded.buffers)

    def rebuild() -> Any:
        try:
            return codec.decode(skeleton, buffers)
        except Exception:
            return shared._load()

    return rebuild


class InstancePool:
    """Looks like the model; each call runs on a free one of ``instances``."""

    def __init__(self, instances: Sequence[Any]) -> None:
        self.instances = list(instances)
        self._free: queue.LifoQueue[Any] = queue.LifoQueue()  # the most recently used: warm caches
        for instance in self.instances:
            self._free.put(instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.instance() as model:
            return model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """A method runs on a free instance; a plain attribute is the first instance's."""
        if name.startswith("_"):
            raise AttributeError(name)
        attribute = getattr(self.instances[0], name)
        if not callable(attribute):
            return attribute
        return functools.partial(self._call, name)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.instance() as model:
            return getattr(model, method)(*args, **kwargs)

    @contextlib.contextmanager
    def instance(self) -> Iterator[Any]:
        """Lend a free instance for the ``with`` block (waits while all are busy)."""
        model = self._free.get()
        try:
            yield model
        finally:
            self._free.put(model)

    def __len__(self) -> int:
        return len(self.instances)

    def __repr__(self) -> str:
        return f"<InstancePool of {len(self.instances)} {type(self.instances[0]).__name__} instances>"
