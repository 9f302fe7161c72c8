"""File-backed segments: weights a loader mapped from a file stay in the file, one copy in the page
cache for every process, and nothing reads them from a file that is no longer the one published."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelshare import Processes, SharedModel, memory
from modelshare._host.inventory import list_segments, segment_sizes
from modelshare.errors import SegmentCorruptedError
from modelshare.loaders import JoblibMmap, TorchStateDict

from ..router.test_router import _clear
from ..support import workers
from ..support.pss import run_shared
from ..support.workers import MiB

torch = pytest.importorskip("torch")


def _weights_file(directory: Path, width: int, depth: int, *, seed: int = 0, read_only: bool = False) -> Path:
    torch.manual_seed(seed)
    path = directory / f"layers-{width}-{depth}-{seed}.pt"
    torch.save(workers.torch_layers(width, depth).state_dict(), path)
    if read_only:
        path.chmod(0o444)
    return path


def _reference(path: Path, width: int, depth: int) -> Any:
    model = workers.torch_layers(width, depth)
    model.load_state_dict(torch.load(path))
    return model.eval()


def _stored(directory: Path) -> int:
    """Bytes the segment directory holds in tmpfs."""
    return memory.segment_bytes(directory)


def test_mapped_weights_are_one_page_cache_copy_for_every_process(tmp_path: Path, shm_dir: Path, spawn: Any) -> None:
    width, depth = 1024, 16  # 64 MiB of weights
    path = _weights_file(tmp_path, width, depth)
    shared = SharedModel(TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth}),
                         key="layers", share=Processes(map_files=True))
    x = torch.randn(4, width)
    run = run_shared(spawn, shm_dir, "torch", workers.torch_use_worker, shared, x, n=3)
    with torch.inference_mode():
        expected = _reference(path, width, depth)(x)
    assert all(torch.equal(out, expected) for out in run.outputs)
    weights = path.stat().st_size
    assert run.segment_bytes < MiB, "the weights were copied into tmpfs"
    assert 0.9 * weights < run.in_segments < 1.1 * weights, run.report(weights)  # one copy, in the file's pages
    assert run.total_pss < run.budget(weights), run.report(weights)


def test_a_mapped_segment_counts_its_full_size_for_budgets_and_ls(tmp_path: Path, shm_dir: Path) -> None:
    width, depth = 512, 8
    path = _weights_file(tmp_path, width, depth)
    shared = SharedModel(TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth}),
                         key="layers", share=Processes(map_files=True))
    with shared.use():
        (info,) = list_segments(shm_dir)
        weights = path.stat().st_size
        assert [f.path for f in info.files] == [str(path)]
        assert info.nbytes >= weights * 0.99 and segment_sizes(shm_dir)[info.stem] == info.nbytes
        assert _stored(shm_dir) < MiB
        listing = subprocess.run([sys.executable, "-m", "modelshare", "ls"], capture_output=True, text=True,
                                 timeout=60)
        assert f"weights mapped from {path}" in listing.stdout, listing.stderr
        shown = json.loads(subprocess.run([sys.executable, "-m", "modelshare", "ls", "--json"], capture_output=True,
                                          text=True, timeout=60).stdout)
        assert shown[0]["files"][0]["path"] == str(path)


@pytest.mark.parametrize("read_only, map_files, mapped", [
    (False, None, False),  # a file someone may rewrite in place: copied by default
    (True, None, True),  # nobody can: mapped
    (True, False, False),  # copying asked for
    (False, True, True),  # the user vouches that files are replaced, not rewritten
])
def test_which_files_are_mapped(tmp_path: Path, shm_dir: Path, read_only: bool, map_files: Any, mapped: bool) -> None:
    width, depth = 512, 8
    path = _weights_file(tmp_path, width, depth, read_only=read_only)
    shared = SharedModel(TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth}),
                         key="layers", share=Processes(map_files=map_files))
    x = torch.randn(2, width)
    with shared.use() as model, torch.inference_mode():
        assert torch.equal(model(x), _reference(path, width, depth)(x))
        assert (_stored(shm_dir) < MiB) == mapped
        assert bool(list_segments(shm_dir)[0].files) == mapped


def _loaded_then_written(path: str, width: int, depth: int) -> Any:
    model = TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth})()
    with torch.no_grad():
        model[0].bias.fill_(3.0)  # a page of the mapping written: no longer the file's bytes
    return model


def test_a_weight_written_after_mapping_is_copied_not_read_back_from_the_file(tmp_path: Path, shm_dir: Path) -> None:
    import functools

    width, depth = 512, 4
    path = _weights_file(tmp_path, width, depth)
    shared = SharedModel(functools.partial(_loaded_then_written, str(path), width, depth), key="written",
                         share=Processes(map_files=True))
    x = torch.randn(2, width)
    expected = _loaded_then_written(str(path), width, depth)
    with shared.use() as model, torch.inference_mode():
        assert float(model[0].bias[0]) == 3.0
        assert torch.equal(model(x), expected(x))
        (info,) = list_segments(shm_dir)
        # the buffers on the written page copied (the bias, and the weights sharing its page), the rest mapped
        assert info.files and 0 < _stored(shm_dir) < path.stat().st_size * 0.6


def test_a_replaced_file_is_a_new_version_and_old_holders_keep_the_old_weights(tmp_path: Path, shm_dir: Path) -> None:
    width, depth = 256, 4
    path = _weights_file(tmp_path, width, depth, seed=0)
    loader = TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth})
    old_reference = _reference(path, width, depth)
    x = torch.randn(2, width)
    old_shared = SharedModel(loader, key="layers", share=Processes(map_files=True))
    with old_shared.use() as old:
        replacement = _weights_file(tmp_path, width, depth, seed=1)
        os.replace(replacement, path)  # written elsewhere, renamed over: the contract
        new_shared = SharedModel(loader, key="layers", share=Processes(map_files=True))
        assert new_shared.version_hash != old_shared.version_hash
        with new_shared.use() as new, torch.inference_mode():
            assert torch.equal(new(x), _reference(path, width, depth)(x))
            assert torch.equal(old(x), old_reference(x))  # still the old inode's pages
            assert len(list_segments(shm_dir)) == 2


@pytest.mark.parametrize("plant", ["rewritten", "symlink", "fifo", "removed"])
def test_attaching_checks_the_file_is_still_the_published_one(tmp_path: Path, shm_dir: Path, spawn: Any,
                                                              plant: str) -> None:
    width, depth = 256, 4
    path = _weights_file(tmp_path, width, depth)
    keep = tmp_path / "keep.pt"
    shutil.copy(path, keep)
    # version= pins the version: the file's identity is not in it, so only the attach check stands guard
    shared = SharedModel(TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth}),
                         key="pinned", version="1", share=Processes(map_files=True))
    x = torch.randn(2, width)
    with shared.use() as model, torch.inference_mode():
        expected = model(x).clone()
        path.unlink()
        if plant == "rewritten":
            shutil.copy(keep, path)  # the same bytes, but not the file that was published
        elif plant == "symlink":
            path.symlink_to(keep)
        elif plant == "fifo":
            os.mkfifo(path)
        queue = spawn.Queue()
        child = spawn.Process(target=workers.attach_error, args=(shared, queue))
        child.start()
        kind, message = queue.get(timeout=120)
        child.join(60)
        assert kind == SegmentCorruptedError.__name__, message
        assert str(path) in message and "replaced" in message and "modelshare gc" in message
        assert torch.equal(model(x), expected)  # this process's mapping is untouched


def test_an_orphan_whose_file_changed_is_loaded_anew(tmp_path: Path, shm_dir: Path, spawn: Any) -> None:
    import signal

    width, depth = 256, 4
    path = _weights_file(tmp_path, width, depth, seed=0)
    shared = SharedModel(TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth}),
                         key="pinned", version="1", share=Processes(map_files=True))
    x = torch.randn(2, width)
    results = spawn.Queue()
    holder = spawn.Process(target=workers.hold_forever, args=(shared, x, results))
    holder.start()
    results.get(timeout=120)
    os.kill(holder.pid, signal.SIGKILL)  # its segment is an orphan now
    holder.join(60)
    os.replace(_weights_file(tmp_path, width, depth, seed=1), path)
    with shared.use() as model, torch.inference_mode():
        assert torch.equal(model(x), _reference(path, width, depth)(x))


def test_joblib_and_safetensors_weights_are_mapped(tmp_path: Path, shm_dir: Path) -> None:
    joblib = pytest.importorskip("joblib")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    arrays = {"w": np.random.default_rng(0).standard_normal((512, 512))}
    joblib.dump(arrays, tmp_path / "arrays.joblib")
    with SharedModel(JoblibMmap(tmp_path / "arrays.joblib"), key="arrays",
                     share=Processes(map_files=True)).use() as model:
        assert np.array_equal(model["w"], arrays["w"]) and _stored(shm_dir) < MiB
    width, depth = 256, 4
    state = workers.torch_layers(width, depth).state_dict()
    safetensors_torch.save_file(state, tmp_path / "layers.safetensors")
    loader = TorchStateDict(workers.torch_layers, tmp_path / "layers.safetensors",
                            params={"width": width, "depth": depth})
    with SharedModel(loader, key="st", share=Processes(map_files=True)).use() as model:
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert _stored(shm_dir) < MiB and list_segments(shm_dir)[0].files


def test_a_forked_child_computes_on_the_mapped_file_and_leaves_the_parents_hold(tmp_path: Path, shm_dir: Path) -> None:
    import multiprocessing

    width, depth = 256, 4
    path = _weights_file(tmp_path, width, depth)
    shared = SharedModel(TorchStateDict(workers.torch_layers, path, params={"width": width, "depth": depth}),
                         key="forked", share=Processes(map_files=True))
    x = torch.randn(2, width)
    model = shared.acquire()
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=workers.attach_error, args=(shared, queue))
    child.start()
    kind, first = queue.get(timeout=60)
    child.join(60)
    assert kind is None and child.exitcode == 0
    assert first == float(next(model.parameters()).flatten()[0])
    assert shared.segment_name.seg_path.exists(), "the child's exit must not release the parent's hold"
    with torch.inference_mode():
        assert torch.equal(model(x), _reference(path, width, depth)(x))
    shared.release(model)


def test_a_router_budget_counts_a_mapped_model_at_its_full_size(tmp_path: Path, shm_dir: Path) -> None:
    from modelshare import Budget, ModelRouter

    width, depth = 512, 4  # 4 MiB each
    paths = [_weights_file(tmp_path, width, depth, seed=seed) for seed in range(2)]
    models = {f"k{i}": SharedModel(TorchStateDict(workers.torch_layers, p, params={"width": width, "depth": depth}),
                                   key=f"k{i}", share=Processes(map_files=True)) for i, p in enumerate(paths)}
    router = ModelRouter(models, budget=Budget(host=6 * MiB), wait=30)
    for key in ("k0", "k1"):
        shared, model = router.acquire(key)
        shared.release(model)
        del model
        assert sum(segment_sizes(shm_dir).values()) <= 6 * MiB
    assert sum(s.evictions for s in router.stats().values()) == 1  # two 4 MiB models never fit 6 MiB together
    assert _stored(shm_dir) < MiB
    _clear(router, models)
