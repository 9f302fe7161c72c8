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
* A ``numpy.memmap`` (joblib's ``mmap_mode``) would pickle in band, as a copy inside the skeleton;
  it goes out of band as the plain array it views, and comes back as a plain (shared) array.
* Buffers smaller than ``min_shared_bytes`` stay inside the pickle: 64-byte alignment and a
  manifest entry are not worth it for a bias vector of eight floats.
* Arrays come back read-only: a write raises numpy's "assignment destination is read-only"
  instead of corrupting other processes' weights.
* Torch tensors anywhere in the object (once torch is imported; this module never imports it)
  go out of band too, as their storages (see ``_torch_storage``). PyTorch has no read-only
  tensors, so such segments are mapped copy-on-write: a write stays private to its process.

Buffers are numbered in the order the pickle stream meets them, whether a PickleBuffer or a
storage's first reference; decoding walks the stream in the same order, so one cursor tells
which buffer comes next.
"""

from __future__ import annotations

import io
import itertools
import pickle
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import cloudpickle
import numpy as np

from ..errors import CopiedOnLoadWarning, EncodeError
from . import Codec, Encoded

__all__ = ["GenericCodec"]

_TORCH_STORAGE = "torch-storage"

# Types known to copy their arrays into private memory when unpickled: sharing saves nothing.
_COPIED_ON_LOAD = {
    "sklearn.tree._tree.Tree": "scikit-learn trees (forests, gradient boosting, decision trees) copy their node "
                               "arrays into private memory when unpickled",
}


def _torch_storage_module() -> Any:
    """``_torch_storage`` if torch is already imported in this process, else None."""
    if "torch" not in sys.modules:
        return None
    from . import _torch_storage

    return _torch_storage


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle, with non-contiguous arrays made contiguous and torch storages left out."""

    def __init__(self, file: io.BytesIO, min_shared_bytes: int, add_storage: Callable[[Any, str], int],
                 **kwargs: Any) -> None:
        super().__init__(file, protocol=5, **kwargs)
        self._min_shared_bytes = min_shared_bytes
        self._add_storage = add_storage
        self._torch = _torch_storage_module()
        self.copied_on_load: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind.__module__.startswith("sklearn.") and f"{kind.__module__}.{kind.__qualname__}" in _COPIED_ON_LOAD:
            self.copied_on_load.add(f"{kind.__module__}.{kind.__qualname__}")
        if isinstance(obj, np.memmap):  # a view of a file (joblib's mmap_mode): share it as a plain array
            obj = obj.view(np.ndarray)
            if obj.flags.c_contiguous or obj.flags.f_contiguous:
                return obj.__reduce_ex__(5)
        if (
            type(obj) is np.ndarray
            and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
            and obj.dtype.hasobject is False
            and obj.nbytes >= self._min_shared_bytes
        ):
            return np.ascontiguousarray(obj).__reduce_ex__(5)
        return super().reducer_override(obj)

    def persistent_id(self, obj: Any) -> Optional[tuple[str, int, str]]:
        found = self._torch.storage_of(obj) if self._torch is not None else None
        if found is None:
            return None
        storage, dtype = found
        return (_TORCH_STORAGE, self._add_storage(storage, dtype), dtype)


class _Unpickler(pickle.Unpickler):
    """Hands buffers out in stream order: to NEXT_BUFFER opcodes and to first storage references."""

    def __init__(self, file: io.BytesIO, buffers: Sequence[memoryview]) -> None:
        self._buffers = buffers
        self._next = 0
        self._load_storage: Optional[Callable[[int, str], Any]] = None
        self._order = self._in_order()
        super().__init__(file, buffers=self._order)

    def drop_buffers(self) -> None:
        """Let go of the segment's views once loaded. The buffer generator's frame refers back to this
        unpickler: left alone, that cycle would keep every view -- and the segment mapped, even after
        release and eviction -- until the cyclic garbage collector happened to run."""
        self._order.close()
        self._buffers = ()
        self._load_storage = None

    def _in_order(self) -> Iterator[memoryview]:
        for _ in itertools.count():
            self._next += 1
            yield self._buffers[self._next - 1]

    def persistent_load(self, pid: Any) -> Any:
        kind, index, dtype = pid
        if kind != _TORCH_STORAGE or index > self._next:
            raise pickle.UnpicklingError(f"unexpected reference {pid!r} in a modelshare skeleton")
        if index == self._next:
            self._next += 1
        if self._load_storage is None:
            from . import _torch_storage

            self._load_storage = _torch_storage.storage_loader(self._buffers)
        return self._load_storage(index, dtype)


class GenericCodec(Codec):
    """Pickle protocol 5 with large buffers out of band; numpy arrays come back as views."""

    name = "generic"

    def __init__(self, min_shared_bytes: int = 1024) -> None:
        self.min_shared_bytes = min_shared_bytes

    def _pickle(self, model: Any, keep: Callable[[pickle.PickleBuffer], bool],
                add_storage: Callable[[Any, str], int]) -> bytes:
        stream = io.BytesIO()
        pickler = _Pickler(stream, self.min_shared_bytes, add_storage, buffer_callback=keep)
        try:
            pickler.dump(model)
        except EncodeError:
            raise
        except Exception as exc:
            raise EncodeError(
                f"a model of type {type(model).__module__}.{type(model).__qualname__} cannot be "
                f"pickled, so its weights cannot be put in shared memory ({type(exc).__name__}: "
                f"{exc}). Use share='threads' (one copy per process, nothing pickled), or "
                "register a codec for this type with modelshare.codecs.register_codec."
            ) from exc
        for path in sorted(pickler.copied_on_load):
            warnings.warn(CopiedOnLoadWarning(
                f"{_COPIED_ON_LOAD[path]} ({path}): every process that attaches this "
                f"{type(model).__qualname__} pays for those arrays again. share=Server(copies=N) keeps N "
                "copies per machine, whatever the number of processes (measured for 200 trees, 4 workers: "
                "349 MiB in all against 842 private); share='threads' one per process. Converting to ONNX "
                "does not help: ONNX Runtime builds its trees in private memory too (1033 MiB)"), stacklevel=4)
        return stream.getvalue()

    def _shares_out_of_band(self, view: memoryview) -> bool:
        return view.nbytes >= self.min_shared_bytes and view.contiguous

    def encode(self, model: Any) -> Encoded:
        encoded = Encoded(b"", [], [])
        storages: dict[tuple[int, int], int] = {}

        def keep(pickle_buffer: pickle.PickleBuffer) -> bool:
            view = memoryview(pickle_buffer)
            if not self._shares_out_of_band(view):
                return True  # in band: written into the skeleton
            encoded.buffer_info.append({"format": view.format, "shape": list(view.shape)})
            encoded.buffers.append(pickle_buffer.raw())
            return False

        def add_storage(storage: Any, dtype: str) -> int:
            torch_storage = _torch_storage_module()
            key = torch_storage.storage_key(storage)
            if key not in storages:
                storages[key] = len(encoded.buffers)
                encoded.buffers.append(torch_storage.storage_bytes(storage, model))
                encoded.buffer_info.append({"torch_storage": dtype})
                encoded.views = "copy-on-write"
            return storages[key]

        encoded.skeleton = self._pickle(model, keep, add_storage)
        return encoded

    def decode(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> Any:
        unpickler = _Unpickler(io.BytesIO(skeleton), buffers)
        try:
            return unpickler.load()
        finally:
            unpickler.drop_buffers()

    def estimate(self, model: Any) -> int:
        total = 0
        storages: set[tuple[int, int]] = set()

        def count(pickle_buffer: pickle.PickleBuffer) -> bool:
            nonlocal total
            view = memoryview(pickle_buffer)
            if not self._shares_out_of_band(view):
                return True
            total += view.nbytes
            return False

        def count_storage(storage: Any, dtype: str) -> int:
            nonlocal total
            key = _torch_storage_module().storage_key(storage)
            if key not in storages:
                storages.add(key)
                total += key[1]
            return 0

        skeleton_bytes = len(self._pickle(model, count, count_storage))
        return skeleton_bytes + total
