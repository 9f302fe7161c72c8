"""Versions from files: new weights on disk are a new version, never a stale attach; refresh()
moves a long-lived process over and the old segment goes with its last holder -- real files,
real processes."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pytest

from modelshare import SharedModel
from modelshare.loaders import JoblibMmap, OnCpu, TorchStateDict

from .support import eventually
from .support.workers import first_weight_in_new_process, loads_counted, weights_from_file


def _write(path: Path, value: int) -> None:
    """Replace the weights file as a deploy does: a new file renamed over the old one."""
    np.save(path.with_suffix(".tmp.npy"), np.full(1 << 18, value, dtype=np.int32))
    os.replace(path.with_suffix(".tmp.npy"), path)


def _watched(path: Path, counter: Path, **options) -> SharedModel:
    return SharedModel(functools.partial(weights_from_file, str(path), str(counter)), key="watched",
                       watch=[path], **options)


def test_new_weights_on_disk_are_a_new_version_and_refresh_moves_over(tmp_path: Path, shm_dir: Path,
                                                                       spawn) -> None:
    path, counter = tmp_path / "w.npy", tmp_path / "loads"
    _write(path, 1)
    shared = _watched(path, counter)
    old = shared.acquire()
    assert old["w"][0] == 1 and shared.refresh() is False, "unchanged files: the same version"
    _write(path, 2)
    queue = spawn.Queue()  # a process started now gets the new weights, though this one holds the old
    child = spawn.Process(target=first_weight_in_new_process, args=(str(path), str(counter), str(shm_dir), queue))
    child.start()
    assert queue.get(timeout=120) == 2
    child.join(60)
    assert shared.acquire() is old, "before refresh(), this process keeps the version it holds"
    shared.release(old)
    assert shared.refresh() is True
    with shared.use() as new:
        assert new["w"][0] == 2 and old["w"][0] == 1, "the old model stays right while it is held"
        assert len(list(shm_dir.glob("*.seg"))) == 2
    del new
    shared.release(old)  # released after refresh(): found under the version it came from
    del old
    assert eventually(lambda: len(list(shm_dir.glob("*.seg"))) == 0), \
        "the old version goes with its last holder (no linger for a version left behind)"
    assert len(loads_counted(str(counter))) == 3, "v1 here, v2 in the child, v2 again here (the child had gone)"


def test_refresh_lets_go_of_a_lingering_old_version_at_once(tmp_path: Path, shm_dir: Path) -> None:
    path, counter = tmp_path / "w.npy", tmp_path / "loads"
    _write(path, 1)
    shared = _watched(path, counter, linger=60)
    with shared.use():
        pass
    (old_segment,) = shm_dir.glob("*.seg")
    _write(path, 2)
    assert shared.refresh() is True
    assert not old_segment.exists(), "lingering, not in use: refresh() let go of it"
    with shared.use() as model:
        assert model["w"][0] == 2
    shared.linger = 0  # let the new one go with the test
    with shared.use():
        pass


def test_a_kept_warm_old_version_is_let_go_at_its_last_release(tmp_path: Path, shm_dir: Path) -> None:
    path, counter = tmp_path / "w.npy", tmp_path / "loads"
    _write(path, 1)
    shared = _watched(path, counter, keep_warm=True)
    old = shared.acquire()
    _write(path, 2)
    assert shared.refresh() is True
    new = shared.acquire()
    shared.release(old)
    del old
    assert eventually(lambda: len(list(shm_dir.glob("*.seg"))) == 1), "keep_warm keeps the current version only"
    shared.release(new)
    del new
    assert len(list(shm_dir.glob("*.seg"))) == 1, "the current version is kept warm"
    for segment in shm_dir.iterdir():
        segment.unlink()


def test_the_same_file_rewritten_in_place_is_a_new_version(tmp_path: Path, shm_dir: Path) -> None:
    path, counter = tmp_path / "w.npy", tmp_path / "loads"
    np.save(path, np.zeros(16, dtype=np.int32))
    first = _watched(path, counter).version_hash
    time.sleep(0.01)
    np.save(path, np.ones(16, dtype=np.int32))  # same inode, new mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert _watched(path, counter).version_hash != first
    assert _watched(path, counter).version_hash == _watched(path, counter).version_hash


def test_loaders_name_their_files(tmp_path: Path) -> None:
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"x")
    assert TorchStateDict(dict, weights).files == (str(weights),)
    assert JoblibMmap(weights).files == (str(weights),)
    assert OnCpu(TorchStateDict(dict, weights)).files == (str(weights),)
    assert OnCpu(dict).files == ()
    shared = SharedModel(TorchStateDict(dict, weights), key="m")
    assert shared.watched == (str(weights),)
    before = shared.version_hash
    weights.write_bytes(b"yy")
    assert shared.refresh() is True and shared.version_hash != before


def test_watch_errors_say_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "w.npy"
    with pytest.raises(ValueError, match="version= or watch=, not both"):
        SharedModel(dict, key="m", version="1", watch=[path])
    with pytest.raises(TypeError, match=r"a list of paths, not one path"):
        SharedModel(dict, key="m", watch=str(path))
    with pytest.raises(FileNotFoundError, match=r"watched file .*w\.npy does not exist"):
        SharedModel(dict, key="m", watch=[path])
    assert SharedModel(TorchStateDict(dict, path), key="m", version="v1").watched == (), \
        "an explicit version= decides alone"
    np.save(path, np.zeros(4))
    shared = SharedModel(dict, key="m", watch=[path])
    path.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shared.refresh()


def test_from_onnx_follows_the_file(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    for share in ("processes", "threads"):
        shared = SharedModel.from_onnx(path, share=share)
        assert shared.watched == (str(path),)
        before = shared.version_hash
        onnx.save(helper.make_model(graph, producer_name="new"), path)
        assert shared.refresh() is True and shared.version_hash != before
    assert SharedModel.from_onnx(path.read_bytes()).watched == ()
