"""The TensorRT codec: one serialized engine per machine, deserialized from shared memory.

A TensorRT engine cannot be split into weights -- its plan is one opaque blob that TensorRT turns
into GPU memory and kernels. What can be shared on the host is the blob: it lives once in the
segment, and every process hands ``Runtime.deserialize_cuda_engine`` a view of it, so no process
reads the engine file or keeps a private copy of its bytes. Extra copies of a model are execution
contexts of one engine (``engine_contexts``), not extra engines.

The TensorRT-specific part is two calls (``engine.serialize()``, ``deserialize_cuda_engine``),
behind ``TensorRTCodec.deserialize``; everything else -- engine files, bytes, segments, views --
is plain Python that is tested without TensorRT. Written against the TensorRT 10+ Python API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..errors import EncodeError
from . import Codec, Encoded

__all__ = ["EnginePlan", "TensorRTCodec", "engine_contexts"]

_MARK = b"modelshare-tensorrt-plan-1"


class EnginePlan:
    """A serialized TensorRT engine (its plan bytes): what ``from_tensorrt`` loads and shares.

    ``EnginePlan.from_file(path)`` reads an engine file; ``EnginePlan(bytes)`` wraps plan bytes.
    """

    def __init__(self, plan: Union[bytes, bytearray, memoryview]) -> None:
        self.plan = memoryview(plan).cast("B")
        if not self.plan.nbytes:
            raise ValueError("an empty TensorRT plan; build or serialize the engine first")

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "EnginePlan":
        return cls(Path(path).read_bytes())


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ImportError(
            "TensorRT is not installed: the TensorRT codec needs NVIDIA's `tensorrt` package (10 or "
            "newer) and a CUDA GPU. Install it with pip install tensorrt on a GPU machine"
        ) from exc
    return tensorrt


def deserialize_engine(plan: memoryview) -> Any:
    """TensorRT: ``Runtime(logger).deserialize_cuda_engine(plan)``; the runtime rides on the engine."""
    trt = _tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the engine (built for another GPU or TensorRT version?)")
    engine._modelshare_runtime = runtime
    return engine


def engine_contexts(engine: Any, copies: int) -> list[Any]:
    """``copies`` execution contexts of one engine: N concurrent instances without N engines."""
    return [engine.create_execution_context() for _ in range(copies)]


class TensorRTCodec(Codec):
    """An ``EnginePlan`` (or a TensorRT ``ICudaEngine``) in, a deserialized engine out."""

    name = "tensorrt"

    def __init__(self, deserialize: Optional[Callable[[memoryview], Any]] = None) -> None:
        self.deserialize = deserialize or deserialize_engine

    def encode(self, model: Any) -> Encoded:
        if isinstance(model, EnginePlan):
            plan = model.plan
        elif type(model).__name__ == "ICudaEngine" and hasattr(model, "serialize"):
            plan = memoryview(model.serialize()).cast("B")
        else:
            raise EncodeError(
                f"the TensorRT codec takes an EnginePlan or a tensorrt.ICudaEngine, not {type(model).__qualname__}"
            )
        return Encoded(_MARK, [plan], [{"tensorrt_plan": plan.nbytes}])

    def decode(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> Any:
        if bytes(skeleton) != _MARK or len(buffers) != 1:
            raise ValueError("not a TensorRT plan segment")
        return self.deserialize(buffers[0])

    def estimate(self, model: Any) -> int:
        return self.encode(model).nbytes
