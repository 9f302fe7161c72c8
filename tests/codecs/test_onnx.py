"""ONNX Runtime sessions over shared initializers: identical outputs, one copy for 4 processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[onnx]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from benchmarks.models import onnx_input, onnx_mlp  # noqa: E402
from modelshare import EncodeError, SharedModel  # noqa: E402
from modelshare.codecs import codec_for  # noqa: E402
from modelshare.codecs.onnx import OnnxCodec  # noqa: E402

from ..support import ROOT  # noqa: E402
from ..support import workers as _workers  # noqa: E402
from ..support.pss import MiB, run_shared  # noqa: E402
from .test_generic import roundtrip  # noqa: E402

FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}


@st.composite
def graphs(draw: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """A random graph: MatMul chains (tied weights allowed), a bfloat16 table cast up, a Gather."""
    elem = draw(st.sampled_from(sorted(FLOATS)))
    dtype = FLOATS[elem]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    dims = draw(st.lists(st.integers(1, 24), min_size=2, max_size=5))
    inits: dict[str, Any] = {}
    nodes, previous = [], "x"
    for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
        same_shape = [name for name, t in inits.items() if list(t.dims) == [n_in, n_out] and t.data_type == elem]
        if same_shape and draw(st.booleans()):
            weight = draw(st.sampled_from(same_shape))  # tied: one initializer used twice
        else:
            weight = f"w{i}"
            inits[weight] = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(dtype), weight)
        nodes.append(helper.make_node("MatMul", [previous, weight], [f"m{i}"]))
        previous = f"m{i}"
    out_dim = dims[-1]
    table_rows = draw(st.integers(1, 40))
    bf16 = rng.standard_normal((table_rows, out_dim)).astype(np.float32)
    bits = (bf16.view(np.uint32) >> 16).astype(np.uint16)
    inits["table"] = helper.make_tensor("table", TensorProto.BFLOAT16, [table_rows, out_dim], bits.tobytes(), raw=True)
    index = rng.integers(0, table_rows, size=(draw(st.integers(1, 5)),), dtype=np.int64)
    inits["index"] = numpy_helper.from_array(index, "index")
    nodes += [helper.make_node("Cast", ["table"], ["table_f"], to=elem),
              helper.make_node("Gather", ["table_f", "index"], ["rows"]),
              helper.make_node("ReduceSum", ["rows"], ["rowsum"], keepdims=1),
              helper.make_node("Add", [previous, "rowsum"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", dims[0]])],
                              [helper.make_tensor_value_info("y", elem, ["N", out_dim])], list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((draw(st.integers(1, 4)), dims[0])).astype(dtype)
    return model, {"x": x}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=graphs(), min_shared=st.sampled_from([0, 16, 1024]))
def test_any_graph_gives_the_outputs_of_a_private_session(case: Any, min_shared: int, tmp_path: Path) -> None:
    model, feeds = case
    codec = OnnxCodec(min_shared_bytes=min_shared)
    expected = codec.private_session(model).run(None, feeds)[0]
    session, mapping = roundtrip(model, tmp_path / "seg", codec)  # encode consumes the ModelProto
    assert isinstance(session, ort.InferenceSession)
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    if min_shared == 0:
        assert len(mapping.buffers) == len({t.name for t in model.graph.initializer})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=graphs(), external=st.sampled_from([None, 0, 64]), min_shared=st.sampled_from([0, 16, 1024]))
def test_a_model_file_read_at_the_wire_level_gives_the_same_outputs(case: Any, external: Any, min_shared: int,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    from modelshare.codecs._onnx_file import MappedOnnxModel
    from modelshare.codecs.onnx import load_onnx_file

    model, feeds = case
    expected = OnnxCodec().private_session(model).run(None, feeds)[0]
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    # external: None = weights inside the .onnx; else external data for initializers of that many bytes and up
    onnx.save(model, path, save_as_external_data=external is not None, location="model.data",
              size_threshold=external or 0)
    loaded = load_onnx_file(path)
    assert isinstance(loaded, MappedOnnxModel)
    # the segment lives in another directory than the model: nothing may still point at the model's files
    session, _ = roundtrip(loaded, tmp_path_factory.mktemp("segment") / "seg", OnnxCodec(min_shared_bytes=min_shared))
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)


def test_publishing_a_model_file_costs_no_private_copy_of_its_weights(shm_dir: Path, tmp_path: Path,
                                                                        spawn) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx_mlp(128, width=1024), path)
    results = spawn.Queue()
    child = spawn.Process(target=_workers.publish_and_measure, args=(SharedModel.from_onnx(path), results))
    child.start()
    peak, loaded = results.get(timeout=300)
    child.join(60)
    assert loaded and child.exitcode == 0
    # onnx.load would hold all 128 MiB privately while writing the segment; the wire-level reader
    # holds the skeleton, and the weights stay in the file's (shared, reclaimable) page cache
    assert peak < 32 * MiB, f"loading cost {peak / MiB:.0f} MiB of private memory"


def test_model_proto_picks_the_onnx_codec_and_shrinks_to_a_skeleton() -> None:
    model = onnx_mlp(8, width=512)
    size = model.ByteSize()
    encoded = codec_for(model).encode(model)
    assert codec_for(onnx.ModelProto()).name == "onnx"
    assert len(encoded.skeleton) < size / 1000, "the skeleton holds structure only"
    assert sum(b.nbytes for b in encoded.buffers) >= 8 * MiB
    with pytest.raises(EncodeError, match="takes an onnx.ModelProto"):
        OnnxCodec().encode({"not": "onnx"})


def test_from_onnx_path_bytes_external_data_and_threads(shm_dir: Path, tmp_path: Path) -> None:
    model = onnx_mlp(16, width=512)
    x = onnx_input(512)
    expected = OnnxCodec().private_session(model).run(None, {"x": x})[0]
    plain, external = tmp_path / "mlp.onnx", tmp_path / "ext.onnx"
    onnx.save(model, plain)
    onnx.save(model, external, save_as_external_data=True, location="ext.weights")
    assert plain.stat().st_size > 16 * MiB > external.stat().st_size
    cases = [SharedModel.from_onnx(plain), SharedModel.from_onnx(external),
             SharedModel.from_onnx(plain.read_bytes(), key="from-bytes"),
             SharedModel.from_onnx(plain, share="threads")]
    assert cases[0].key == "mlp" and cases[1].key == "ext"
    for shared in cases:
        with shared.use() as session:
            np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        SharedModel.from_onnx(tmp_path / "missing.onnx")


def test_prepacking_on_by_choice(shm_dir: Path, tmp_path: Path) -> None:
    model = onnx_mlp(8, width=512)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = onnx_input(512)
    options = {"intra_op_num_threads": 1, "config": {"session.intra_op.allow_spinning": "0"}}
    shared = SharedModel.from_onnx(path, prepack=True, session_options=options)
    expected = OnnxCodec(prepack=True, session_options=options).private_session(onnx.load(path))
    with shared.use() as session:
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected.run(None, {"x": x})[0])
        assert session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="unknown session options"):
        SharedModel.from_onnx(path, session_options={"threads": 2})


def test_four_processes_share_a_256_mib_onnx_model(shm_dir: Path, tmp_path: Path, spawn) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx_mlp(256), path)
    x = onnx_input()
    expected = OnnxCodec().private_session(onnx.load(path)).run(None, {"x": x})[0]
    shared = SharedModel.from_onnx(path, key="onnx-mlp-256")
    run = run_shared(spawn, shm_dir, "onnxruntime", _workers.onnx_use_worker, shared, x)
    weights = 256 * MiB
    print(run.report(weights))
    for out in run.outputs:
        np.testing.assert_array_equal(out, expected)
    assert run.total_pss <= run.budget(weights), run.report(weights)
    assert run.in_segments == pytest.approx(weights, rel=0.02), run.report(weights)


@settings(max_examples=10, deadline=None)
@given(case=graphs())
def test_buffers_not_in_a_file_still_decode(case: Any) -> None:
    model, feeds = case
    codec = OnnxCodec(min_shared_bytes=0)
    expected = codec.private_session(model).run(None, feeds)[0]
    encoded = codec.encode(model)
    session = codec.decode(memoryview(encoded.skeleton), [memoryview(bytes(b)) for b in encoded.buffers])
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)


def test_attaching_processes_do_not_import_onnx(shm_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    onnx.save(onnx_mlp(4, width=256), path)
    shared = SharedModel.from_onnx(path)
    holder = shared.acquire()  # published here; the child only attaches
    code = ("import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); s = m.acquire(); "
            "import numpy as np; s.run(None, {'x': np.ones((1, 256), np.float32)}); "
            "print('onnx' in sys.modules); m.release(s)")
    import pickle

    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(shared), capture_output=True,
                         timeout=120, cwd=ROOT)
    shared.release(holder)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "False"


def test_shared_prepacking_runs_packed_kernels_over_one_copy_for_four_processes(shm_dir: Path, tmp_path: Path,
                                                                                 spawn) -> None:
    """prepack="shared": the layouts ORT packs are made once and mapped by every process -- outputs
    bit-identical to a private session that prepacks, PSS of one copy, no private packed copy."""
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx_mlp(256), path)
    x = onnx_input()
    options = {"intra_op_num_threads": 1}
    expected = OnnxCodec(prepack=True, session_options=options).private_session(onnx.load(path)).run(None, {"x": x})[0]
    shared = SharedModel.from_onnx(path, key="packed", prepack="shared", session_options=options)
    run = run_shared(spawn, shm_dir, "onnxruntime", _workers.onnx_use_worker, shared, x)
    weights = 256 * MiB
    print(run.report(weights), f"; segments {run.segment_bytes / MiB:.0f} MiB")
    for out in run.outputs:
        np.testing.assert_array_equal(out, expected)
    assert run.total_pss <= run.budget(weights), run.report(weights)  # the layouts once, no private copy
    assert run.in_segments == pytest.approx(weights, rel=0.05), run.report(weights)  # what the kernels map
    assert run.segment_bytes == pytest.approx(2 * weights, rel=0.02)  # the weights and their layouts


def test_shared_prepacking_is_its_own_version_and_takes_models_in_memory(shm_dir: Path) -> None:
    model = onnx_mlp(4, width=256)
    x = onnx_input(256)
    expected = OnnxCodec(prepack=True).private_session(model).run(None, {"x": x})[0]
    plain = SharedModel.from_onnx(model.SerializeToString(), key="m")
    packed = SharedModel.from_onnx(model.SerializeToString(), key="m", prepack="shared")
    assert plain.version_hash != packed.version_hash, "a segment's layout is part of its version"
    with plain.use() as unpacked_session, packed.use() as packed_session:
        np.testing.assert_array_equal(packed_session.run(None, {"x": x})[0], expected)
        np.testing.assert_allclose(unpacked_session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)
        assert len(list(shm_dir.glob("m--*.seg"))) == 2


def test_shared_prepacking_threads_and_wrong_choices(shm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(onnx_mlp(4, width=256), path)
    x = onnx_input(256)
    expected = OnnxCodec(prepack=True).private_session(onnx.load(path)).run(None, {"x": x})[0]
    with SharedModel.from_onnx(path, prepack="shared", share="threads").use() as session:  # a private packing
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)
    with pytest.raises(ValueError, match=r"prepack must be False, True or 'shared', not 'yes'"):
        SharedModel.from_onnx(path, prepack="yes")
    with pytest.raises(ValueError, match=r"prepack='shared' shares the layouts ORT's CPU kernels pack"):
        SharedModel.from_onnx(path, prepack="shared", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_the_estimate_counts_the_packed_layouts(tmp_path: Path) -> None:
    model = onnx_mlp(4, width=256)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    plain = OnnxCodec().estimate(model)
    assert OnnxCodec(prepack="shared").estimate(model) == pytest.approx(2 * plain, rel=0.01)
    from modelshare.codecs.onnx import load_onnx_file

    encoded = OnnxCodec(prepack="shared").encode(load_onnx_file(path))
    assert OnnxCodec(prepack="shared").estimate(load_onnx_file(path)) == pytest.approx(encoded.nbytes, rel=0.02)
