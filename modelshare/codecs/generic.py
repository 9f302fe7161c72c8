"""The generic codec: any picklable model, with its numpy arrays shared instead of copied.

Pickle protocol 5 hands every large contiguous buffer (numpy arrays, and anything that pickles
through them) to a ``buffer_callback`` instead of writing it into the pickle stream. Those
buffers go into the segment; the pickle that is left is the skeleton. ``pickle.loads(skeleton,
buffers=views)`` then rebuilds the object with each array wrapping its view of the segment --
read-only, zero-copy -- so a dict of arrays, a scikit-learn estimator or a user's own class come
back holding shared memory.

Details that matter:

* The skeleton is written by cloudpickle, so classes and functions defined in ``__main__`` or
  inside a function travel by value (as they must to reach a spawned process).
* A non-contiguous array (a slice with steps, a transpose that is neither C- nor F-ordered) is
  made contiguous first, so that it too goes out of band; it comes back equal, with C strides.
* Buffers smaller than ``min_shared_bytes`` stay inside the pickle: 64-byte alignment and a
  manifest entry are not worth it for a bias vector of eight floats.
* Arrays come back read-only: a write raises numpy's "assignment destination is read-only"
  instead of corrupting other processes' weights.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Sequence

import cloudpickle
import numpy as np

from ..errors import EncodeError
from . import Codec, Encoded

__all__ = ["GenericCodec"]


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle, except that non-contiguous arrays are pickled as contiguous copies."""

    def __init__(self, file: io.BytesIO, min_shared_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, protocol=5, **kwargs)
        self._min_shared_bytes = min_shared_bytes

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is np.ndarray
            and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
            and obj.dtype.hasobject is False
            and obj.nbytes >= self._min_shared_bytes
        ):
            return np.ascontiguousarray(obj).__reduce_ex__(5)
        return super().reducer_override(obj)


class GenericCodec(Codec):
    """Pickle protocol 5 with large buffers out of band; numpy arrays come back as views."""

    name = "generic"

    def __init__(self, min_shared_bytes: int = 1024) -> None:
        self.min_shared_bytes = min_shared_bytes

    def _pickle(self, model: Any, keep: Any) -> bytes:
        stream = io.BytesIO()
        try:
            _Pickler(stream, self.min_shared_bytes, buffer_callback=keep).dump(model)
        except Exception as exc:
            raise EncodeError(
                f"a model of type {type(model).__module__}.{type(model).__qualname__} cannot be "
                f"pickled, so its weights cannot be put in shared memory ({type(exc).__name__}: "
                f"{exc}). Use share='threads' (one copy per process, nothing pickled), or "
                "register a codec for this type with modelshare.codecs.register_codec."
            ) from exc
        return stream.getvalue()

    def encode(self, model: Any) -> Encoded:
        buffers: list[memoryview] = []
        info: list[dict[str, Any]] = []

        def keep(pickle_buffer: pickle.PickleBuffer) -> bool:
            view = memoryview(pickle_buffer)
            if view.nbytes < self.min_shared_bytes or not view.contiguous:
                return True  # in band: written into the skeleton
            info.append({"format": view.format, "shape": list(view.shape)})
            buffers.append(pickle_buffer.raw())
            return False

        skeleton = self._pickle(model, keep)
        return Encoded(skeleton, buffers, info)

    def decode(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> Any:
        return pickle.loads(skeleton, buffers=buffers)

    def estimate(self, model: Any) -> int:
        total = 0

        def count(pickle_buffer: pickle.PickleBuffer) -> bool:
            nonlocal total
            view = memoryview(pickle_buffer)
            if view.nbytes < self.min_shared_bytes or not view.contiguous:
                return True
            total += view.nbytes
            return False

        skeleton_bytes = len(self._pickle(model, count))
        return skeleton_bytes + total
