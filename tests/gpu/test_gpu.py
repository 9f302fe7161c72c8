"""GPU copies on a real GPU (``Processes(device="cuda:0")``): four spawned processes on one
copy within the issue's memory bound, outputs equal to a private GPU load, a SIGKILL of the
process that loaded it, GPU budgets, read-only weights. Skipped, with the reason, without a GPU,
torch built with CUDA and nvidia-ml-py (CI has none: ``tests/gpu/test_device_copies.py`` covers the
part that runs without a GPU). The measured numbers come from ``python -m benchmarks.gpu``."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from modelshare import MemoryBudgetExceeded, memory

torch = pytest.importorskip("torch", reason="GPU copies hold torch tensors")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and memory.gpus()),
                                reason="needs an NVIDIA GPU, torch with CUDA and nvidia-ml-py (none here)")

from benchmarks.gpu import workers as _gpu_workers  # noqa: E402
from benchmarks.gpu.benchmark import bare_process_bytes, receive, run_set  # noqa: E402
from benchmarks.models import MiB, torch_input, torch_mlp  # noqa: E402

WIDTH, BATCH = 4096, 64


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpu") / "mlp.pt"
    torch.save(torch_mlp(1024, WIDTH), path)  # 1 GiB of float32 weights
    return path


def test_four_processes_compute_on_one_copy(model_file: Path, shm_dir: Path) -> None:
    x = torch_input(WIDTH, BATCH)
    bare = bare_process_bytes(WIDTH, BATCH)
    private = run_set("private", str(model_file), str(shm_dir), x, 1, 1)
    shared = run_set("modelshare", str(model_file), str(shm_dir), x, 4, 20)
    assert shared["loaders"] == 1  # the loader ran once for the four
    assert torch.equal(shared["first_output"], private["first_output"])  # same result as a private load
    weights = model_file.stat().st_size
    bound = (weights + 4 * bare) * 1.10
    assert shared["used_mib"] * MiB <= bound, (shared["used_mib"], bare / MiB)
    assert private["used_mib"] * MiB > weights  # a private copy pays for the weights: the check can fail
    # the copy is counted once for the four processes, whoever made it
    assert abs(shared["gpu_usage_mib"] - shared["used_mib"]) <= 0.10 * shared["used_mib"]
    assert shared["after_exit_mib"] <= 8  # the copy went with its last holder


def test_sigkill_of_the_loader_leaves_the_others_computing(model_file: Path, shm_dir: Path) -> None:
    start = memory.gpus()[0].used
    crash = run_set("modelshare", str(model_file), str(shm_dir), torch_input(WIDTH, BATCH), 4, 5, kill_loader=True)
    assert crash["survivors"] == 3 and crash["survivors_kept_computing"] and crash["survivors_correct"]
    assert crash["after_exit_mib"] <= 8 and (memory.gpus()[0].used - start) <= 8 * MiB


def test_a_gpu_budget_refuses_before_allocating(shm_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    torch.save(torch_mlp(256, 2048), path)
    shared = _gpu_workers.shared_model(str(path), str(shm_dir), gpu_budget="64MiB")
    before = memory.gpus()[0].used
    # 256 MiB of weights, rounded up to the GPU's allocation granularity (2 MiB)
    with pytest.raises(MemoryBudgetExceeded, match=r"'gpu-mlp' needs 25\d\.\d MiB on cuda:0; the GPU budget there "
                                                   r"is 64\.0 MiB"):
        shared.acquire()
    assert memory.gpus()[0].used - before < 256 * MiB  # refused before allocating anything


def test_a_write_into_the_shared_weights_fails_in_the_writer(model_file: Path, shm_dir: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    results, start, done = ctx.Queue(), ctx.Event(), ctx.Event()
    x = torch_input(WIDTH, BATCH)
    holder = ctx.Process(target=_gpu_workers.compute_worker,
                         args=("modelshare", str(model_file), str(shm_dir), x, 2, results, start, done))
    holder.start()
    receive(results, [holder])
    from modelshare import list_gpu_copies

    if not list_gpu_copies(shm_dir)[0].read_only:
        done.set()
        start.set()
        holder.join(60)
        pytest.skip("this driver maps device memory read-write only: writes are not refused")
    writer = ctx.Process(target=_gpu_workers.write_worker, args=(str(model_file), str(shm_dir), results))
    writer.start()
    try:
        outcome = receive(results, [writer])
    except RuntimeError as died:  # killed by its own illegal write: refused too, and only there
        outcome = ("refused", str(died))
    writer.join(60)
    start.set()
    timed = receive(results, [holder])
    done.set()
    holder.join(120)
    assert outcome[0] == "refused", outcome
    assert timed[0] == "timed" and timed[3]  # the holder's outputs never changed


def test_a_router_waits_for_a_gpu_copy_in_use_then_names_it(shm_dir: Path, tmp_path: Path) -> None:
    from modelshare import Budget, ModelRouter

    paths = {}
    for key, seed in (("a", 1), ("b", 2)):
        paths[key] = tmp_path / f"{key}.pt"
        torch.save(torch_mlp(256, 2048, seed=seed), paths[key])
    router = ModelRouter(factory=lambda key: _gpu_workers.shared_model(str(paths[key]), str(shm_dir), key=key),
                         budget=Budget(gpu={0: "300MiB"}), wait=1.0)
    held_model = router.acquire("a")[1]
    with pytest.raises(MemoryBudgetExceeded, match=r"'b' needs 25\d\.\d MiB on cuda:0.*a 25\d\.\d MiB \(pids"):
        router.acquire("b")  # "a" is in use: waited a second for it, then named it
    router.model("a").release(held_model)
    del held_model  # the GPU copy goes with the last tensor on it
    shared_b, model_b = router.acquire("b")  # now it fits
    assert next(model_b.parameters()).is_cuda
    shared_b.release(model_b)
    del model_b
    from ..router.test_router import _clear

    _clear(router, ["a", "b"])  # the router keeps released models warm on purpose
