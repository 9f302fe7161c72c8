"""The TensorRT codec: the plan lives once in shared memory, every process deserializes a view.

TensorRT needs NVIDIA's libraries and a GPU, which CI does not have. What is TensorRT's own is two
calls (serialize, deserialize_cuda_engine); everything around them -- plan files and bytes,
segments, the view each process hands to the deserializer -- is tested here through the codec's
``deserialize`` hook, with real processes. The real engine test runs where TensorRT is installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modelshare import EncodeError, SharedModel
from modelshare.codecs import codec_for
from modelshare.codecs.tensorrt import EnginePlan, TensorRTCodec

from ..support import leftovers
from ..support import workers as _workers

PLAN = bytes(range(256)) * 4096  # 1 MiB of recognisable plan bytes


def test_plan_file_is_shared_as_one_view_per_process(shm_dir: Path, tmp_path: Path, spawn) -> None:
    path = tmp_path / "model.engine"
    path.write_bytes(PLAN)
    shared = SharedModel.from_tensorrt(path, codec=TensorRTCodec(deserialize=_workers.describe_plan))
    assert shared.key == "model"
    results, done = spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=_workers.tensorrt_plan_worker, args=(shared, None, results, done), daemon=True)
             for _ in range(3)]
    for p in procs:
        p.start()
    seen = [results.get(timeout=120)[1] for _ in procs]
    done.set()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    for engine in seen:
        assert engine["nbytes"] == len(PLAN) and engine["head"] == PLAN[:16]
        assert engine["in_segment"], "the deserializer must get a view of the segment, not a copy"
    assert leftovers(shm_dir) == []


def test_plan_bytes_and_types(shm_dir: Path) -> None:
    shared = SharedModel.from_tensorrt(PLAN, codec=TensorRTCodec(deserialize=_workers.describe_plan))
    assert shared.key.startswith("trt-")
    with shared.use() as engine:
        assert engine["nbytes"] == len(PLAN)
    assert codec_for(EnginePlan(PLAN)).name == "tensorrt"
    with pytest.raises(EncodeError, match="takes an EnginePlan or a tensorrt.ICudaEngine"):
        TensorRTCodec().encode(b"not a plan")
    with pytest.raises(ValueError, match="empty TensorRT plan"):
        EnginePlan(b"")
    with pytest.raises(FileNotFoundError, match="no TensorRT engine at"):
        SharedModel.from_tensorrt(Path("/nonexistent.engine"))


def test_without_tensorrt_the_error_says_what_to_install(shm_dir: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here; this checks the message where it is not")
    with pytest.raises(ImportError, match=r"TensorRT is not installed.*pip install tensorrt"):
        SharedModel.from_tensorrt(PLAN).acquire()
    assert leftovers(shm_dir) == []


def test_real_engine_roundtrip(shm_dir: Path) -> None:
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (needs NVIDIA's libraries and a GPU)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    x = network.add_input("x", trt.float32, (4, 8))
    network.mark_output(network.add_identity(x).get_output(0))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    from modelshare.codecs.tensorrt import engine_contexts

    with SharedModel.from_tensorrt(bytes(plan)).use() as engine:
        (context,) = engine_contexts(engine, 1)
        inputs = torch.arange(32, dtype=torch.float32, device="cuda").reshape(4, 8)
        outputs = torch.empty_like(inputs)
        context.set_tensor_address(engine.get_tensor_name(0), inputs.data_ptr())
        context.set_tensor_address(engine.get_tensor_name(1), outputs.data_ptr())
        stream = torch.cuda.current_stream()
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        assert torch.equal(inputs, outputs)
