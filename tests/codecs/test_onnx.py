"""ONNX Runtime sessions over shared initializers: identical outputs, one copy for 4 processes."""

from __future__ import annotations

import os
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
from modelshare import EncodeError, Processes, SharedModel, memory  # noqa: E402
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


def _graph_in_a_file(case: Any, external: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """``case``'s model saved to a file -- ``external``: None = weights inside the .onnx; else external
    data for initializers of that many bytes and up -- with its feeds and a private session's output."""
    model, feeds = case
    expected = OnnxCodec().private_session(model).run(None, feeds)[0]
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(model, path, save_as_external_data=external is not None, location="model.data",
              size_threshold=external or 0)
    return path, feeds, expected


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=graphs(), external=st.sampled_from([None, 0, 64]), min_shared=st.sampled_from([0, 16, 1024]))
def test_a_model_file_read_at_the_wire_level_gives_the_same_outputs(case: Any, external: Any, min_shared: int,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    from modelshare.codecs._onnx_file import MappedOnnxModel
    from modelshare.codecs.onnx import load_onnx_file

    path, feeds, expected = _graph_in_a_file(case, external, tmp_path_factory)
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


_UNUSED_BY_A_WORKER = ("onnx", "_hashlib", "logging", "cloudpickle", "tempfile", "multiprocessing",
                       "modelshare._router", "modelshare._owners", "modelshare._gpu")
_WORKER = """
import sys
import numpy as np
from modelshare import Processes, SharedModel
m = SharedModel.from_onnx(sys.argv[1], share=Processes(map_files=True))
s = m.acquire()
s.run(None, {{'x': np.ones((1, 256), np.float32)}})
print(m.hold_info().loaded_here, [name for name in {unused!r} if name in sys.modules], flush=True)
if m.hold_info().loaded_here:  # the publisher holds the model while a second worker attaches
    import subprocess
    subprocess.run([sys.executable, *sys.argv], check=True)
m.release(s)
""".format(unused=_UNUSED_BY_A_WORKER)


def test_a_worker_of_a_model_file_loads_only_what_it_runs(shm_dir: Path, tmp_path: Path) -> None:
    """Every module a worker loads costs it memory and start-up (``import onnx``: half a second cold,
    ~10 MiB; hashlib's OpenSSL, logging, cloudpickle, tempfile: 0.2-1.5 MiB each): the publisher
    splits a file at the wire level, and neither it nor an attaching worker loads any of them."""
    import subprocess
    import sys

    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    for external in (False, True):
        path = tmp_path / f"m{int(external)}.onnx"
        onnx.save(onnx_mlp(4, width=256), path, save_as_external_data=external, location=f"m{int(external)}.data")
        out = subprocess.run([sys.executable, str(worker), str(path)], capture_output=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "MODELSHARE_DIR": str(shm_dir)})
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().split("\n")[:2] == ["True []", "False []"], f"external={external}: {out.stdout}"


def test_typed_and_string_initializers_in_a_model_file(tmp_path: Path) -> None:
    """Initializers whose data are typed fields (``float_data``) take the proto path, and strings stay
    in the skeleton: both give a private session's outputs, the large raw weight still shared."""
    from modelshare.codecs.onnx import load_onnx_file

    rng = np.random.default_rng(5)
    weight = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    typed_bias = helper.make_tensor("b", TensorProto.FLOAT, [64], rng.standard_normal(64).tolist())
    labels = helper.make_tensor("labels", TensorProto.STRING, [2], [b"no", b"yes"])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]),
         helper.make_node("Identity", ["labels"], ["names"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64]),
         helper.make_tensor_value_info("names", TensorProto.STRING, [2])], [weight, typed_bias, labels])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    expected = OnnxCodec().private_session(model).run(None, feeds)
    for typed in (True, False):
        if not typed:
            model.graph.initializer[1].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(typed_bias), "b"))
        path = tmp_path / f"typed{int(typed)}.onnx"
        onnx.save(model, path)
        session, mapping = roundtrip(load_onnx_file(path), tmp_path / f"seg{int(typed)}", OnnxCodec(min_shared_bytes=0))
        got = session.run(None, feeds)
        np.testing.assert_array_equal(got[0], expected[0])
        assert list(got[1]) == list(expected[1])
        assert len(mapping.buffers) == 2, f"typed={typed}: the weight and the bias are shared, the strings not"


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


# -- file-backed: the weights stay in the ONNX file (or its external data), mapped by every process ---------------


def _saved(model: Any, directory: Path, *, external: bool, read_only: bool = True) -> Path:
    """``model`` saved under ``directory`` (weights in the .onnx, or in ``model.data`` beside it)."""
    path = directory / "model.onnx"
    onnx.save(model, path, save_as_external_data=external, location="model.data", size_threshold=1024)
    if read_only:
        for file in directory.iterdir():
            file.chmod(0o444)
    return path


@pytest.mark.parametrize("external", [False, True], ids=["weights-in-the-onnx", "external-data"])
def test_an_onnx_file_nobody_can_rewrite_stays_mapped_one_copy_for_every_process(
        shm_dir: Path, tmp_path: Path, spawn: Any, external: bool) -> None:
    """No copy in /dev/shm: the segment records where each initializer lies in the model's files,
    every process maps them (page cache, one copy) and ORT reads them there for its optimizers."""
    path = _saved(onnx_mlp(64, width=1024), tmp_path, external=external)
    x = onnx_input(1024)
    expected = OnnxCodec().private_session(onnx.load(path)).run(None, {"x": x})[0]
    shared = SharedModel.from_onnx(path, key="mapped-onnx")
    run = run_shared(spawn, shm_dir, "onnxruntime", _workers.onnx_use_worker, shared, x, n=3)
    weights = 64 * MiB
    print(run.report(weights), f"; segments {run.segment_bytes / MiB:.2f} MiB")
    for out in run.outputs:
        np.testing.assert_array_equal(out, expected)
    assert run.segment_bytes < MiB, "the weights were copied into tmpfs"
    assert run.in_segments == pytest.approx(weights, rel=0.05), run.report(weights)  # the file's pages, once
    private = (run.total_pss - run.bare_pss - run.in_segments) / len(run.outputs)
    assert private < weights / 4, f"{private / MiB:.0f} MiB private per process: " + run.report(weights)


def _typed_fields(model: Any) -> Any:
    """``model`` with one large initializer in ``float_data`` (not raw bytes): it cannot stay in the file."""
    first = model.graph.initializer[0]
    values = numpy_helper.to_array(first)
    first.ClearField("raw_data")
    first.float_data.extend(values.ravel().tolist())
    return model


@pytest.mark.parametrize("case, mapped", [
    ("read-only", True), ("writable", False), ("writable, map_files=True", True), ("map_files=False", False),
    ("one initializer in typed fields", False), ('prepack="shared"', False)])
def test_which_onnx_files_stay_mapped(shm_dir: Path, tmp_path: Path, case: str, mapped: bool) -> None:
    """All or nothing: ORT reads external data from one directory, so one buffer that must be copied
    (typed fields; packed layouts, which live in the segment) means every buffer is copied."""
    from modelshare._host.inventory import list_segments

    model = _typed_fields(onnx_mlp(4, width=512)) if "typed" in case else onnx_mlp(4, width=512)
    path = _saved(model, tmp_path, external=True, read_only="writable" not in case)
    map_files = True if "map_files=True" in case else False if "map_files=False" in case else None
    prepack = "shared" if "prepack" in case else False
    x = onnx_input(512)
    expected = OnnxCodec(prepack=prepack is not False).private_session(onnx.load(path)).run(None, {"x": x})[0]
    shared = SharedModel.from_onnx(path, share=Processes(map_files=map_files), prepack=prepack)
    with shared.use() as session:
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)
        (info,) = list_segments(shm_dir)
        assert bool(info.files) == mapped, info.files
        assert (memory.segment_bytes(shm_dir) < MiB) == mapped


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=graphs(), external=st.sampled_from([None, 0, 64]))
def test_a_mapped_model_file_gives_the_outputs_of_a_private_session(case: Any, external: Any,
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """Constant folding (the bfloat16 table's Cast) reads the initializers from the user's files."""

    path, feeds, expected = _graph_in_a_file(case, external, tmp_path_factory)
    directory = tmp_path_factory.mktemp("segments")
    shared = SharedModel.from_onnx(path, share=Processes(map_files=True), directory=directory)
    with shared.use() as session:
        np.testing.assert_array_equal(session.run(None, feeds)[0], expected)


class _ReplacedWhileDecoding(OnnxCodec):
    """Replaces the model's external data (renamed over, as a deploy does) right before the first
    decode: what another process does between this one mapping the file and ORT reopening it."""

    def __init__(self, data: Path, new_data: Path) -> None:
        super().__init__()
        self.data, self.new_data = data, new_data

    def decode(self, skeleton: memoryview, buffers: Any) -> Any:
        if self.new_data.exists():
            os.replace(self.new_data, self.data)
        return super().decode(skeleton, buffers)


def test_a_weights_file_replaced_while_a_session_is_made_is_loaded_anew(shm_dir: Path, tmp_path: Path) -> None:
    """ORT reopens the weights file by its path: a file replaced since it was mapped would feed its
    optimizers other bytes than the kernels compute on. The hold sees the path changed, lets the
    stale segment go, and serves the file's current weights."""
    from modelshare._model_source import FileOrBytes
    from modelshare.codecs.onnx import load_onnx_bytes, load_onnx_file

    path = _saved(onnx_mlp(4, width=512, seed=1), tmp_path, external=True, read_only=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    _saved(onnx_mlp(4, width=512, seed=2), staging, external=True, read_only=False)
    x = onnx_input(512)
    expected = OnnxCodec().private_session(onnx.load(staging / "model.onnx")).run(None, {"x": x})[0]
    codec = _ReplacedWhileDecoding(tmp_path / "model.data", staging / "model.data")
    shared = SharedModel(FileOrBytes(path, "ONNX model", load_onnx_file, load_onnx_bytes), key="replaced",
                         codec=codec, share=Processes(map_files=True), version="1")
    with shared.use() as session:
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], expected)
