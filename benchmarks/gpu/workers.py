"""Worker processes for the GPU measurements (``benchmarks.gpu``) and tests (``tests/gpu/test_gpu.py``).

Every approach serves the same calls: a CPU batch in, the model run on the GPU, a CPU result out
-- which is what crosses Beam's socket in ``MultiProcessShared``, so each approach pays the same
transfers and differs only in where the model lives and who runs it:

* ``modelshare``: ``SharedModel(share=Processes(device="cuda:0"))`` -- one copy on the GPU, every process computes;
* ``private``: each process loads its own copy onto the GPU (Beam's default per SDK worker);
* ``beam``: Beam's ``MultiProcessShared(always_proxy=True)`` (what ``large_model=True`` uses): the
  model on the GPU in one server process, every call pickled to it and back.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Optional

APPROACHES = ("modelshare", "private", "beam")


class OnGpu:
    """A model on the GPU called with CPU batches, returning CPU results."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(x.to("cuda")).cpu()


def load_cpu(path: str) -> Any:
    """The benchmark model from its file, on the CPU (a SharedModel loader: modelshare places it)."""
    import torch

    return torch.load(path, weights_only=False, mmap=True)


def load_on_gpu(path: str) -> OnGpu:
    """The model loaded privately onto the GPU, as Beam's PyTorch handler does per process."""
    return OnGpu(load_cpu(path).to("cuda"))


def shared_model(path: str, directory: str, key: str = "gpu-mlp", gpu_budget: Optional[str] = None) -> Any:
    from modelshare import Processes, SharedModel

    return SharedModel(functools.partial(load_cpu, path), key=key, version=str(os.stat(path).st_mtime_ns),
                       directory=directory, share=Processes(device="cuda:0", gpu_budget=gpu_budget))


def _model(approach: str, path: str, directory: str) -> tuple[Any, bool]:
    """(callable model, whether this process loaded it) for ``approach``."""
    if approach == "modelshare":
        shared = shared_model(path, directory)
        model = OnGpu(shared.acquire())
        info = shared.hold_info()
        return model, bool(info and info.loaded_here)
    if approach == "private":
        return load_on_gpu(path), True
    from apache_beam.utils.multi_process_shared import MultiProcessShared

    proxy = MultiProcessShared(functools.partial(load_on_gpu, path), tag="gpu-mlp", path=directory,
                               always_proxy=True).acquire()
    return proxy, False


def bare_cuda_worker(width: int, batch: int, results: Any, done: Any) -> None:
    """A process that initialised CUDA and ran one layer's kernels (cuBLAS loaded, workspace taken)
    and then freed its tensors: the floor every GPU worker pays, weights aside."""
    import torch

    w = torch.ones(width, width, device="cuda")
    (torch.ones(batch, width, device="cuda") @ w).sum().item()
    del w
    torch.cuda.empty_cache()
    results.put(("bare", os.getpid()))
    done.wait()


def compute_worker(approach: str, path: str, directory: str, x: Any, calls: int, results: Any, start: Any,
                   done: Any) -> None:
    """Get the model ``approach``'s way and report its first output; on ``start``, time ``calls``
    calls; then keep calling until ``done``, reporting every half second how many calls ran and
    whether every output so far equalled the first."""
    model, loaded = _model(approach, path, directory)
    first = model(x)
    results.put(("ready", os.getpid(), loaded, first))
    start.wait()
    began = time.perf_counter()
    same = True
    for _ in range(calls):
        same &= bool((model(x) == first).all())
    results.put(("timed", os.getpid(), time.perf_counter() - began, same))
    count, last_report = 0, time.monotonic()
    while not done.is_set():
        same &= bool((model(x) == first).all())
        count += 1
        if time.monotonic() - last_report > 0.5:
            results.put(("running", os.getpid(), count, same))
            last_report = time.monotonic()


def write_worker(path: str, directory: str, results: Any) -> None:
    """Attach the shared copy and write into a weight: report what happened (it should fail here,
    in this process, where the copy is mapped read-only)."""
    import torch

    shared = shared_model(path, directory)
    model = shared.acquire()
    try:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        torch.cuda.synchronize()
        results.put(("wrote", ""))
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        results.put(("refused", f"{type(exc).__name__}: {exc}"))
