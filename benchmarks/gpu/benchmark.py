"""GPU: N processes computing on one copy of a model's weights, against private copies and Beam's
``MultiProcessShared``, with GPU memory from NVML -- and the crash check.

    python -m benchmarks.gpu [--size-mib 1024] [--processes 4] [--calls 100] [--batch 64] [--out DIR]

For each approach (``benchmarks.gpu.workers``) N spawned processes get the same float32 MLP and
time the same calls (a CPU batch in, a CPU result out); measured: calls/s of the whole set, the
GPU's used memory above where it started (NVML, sampled every 20 ms; peak), NVML's per-process
figures, whether outputs equal those of a private GPU load, and the used memory after all exit.
The memory bound checked for modelshare is the issue's: weights once + N x a bare CUDA process
(CUDA initialised, one layer's kernels run, tensors freed) + 10%.

First the crash check: N processes compute on the shared copy, the one that ran the loader is
SIGKILLed mid-computation, the others keep computing (every output still equal to their first),
and once all exit the GPU's used memory is back where it started.

Writes ``gpu.json`` in ``--out`` and prints the table for ``benchmarks/RESULTS.md``. Needs a GPU,
torch with CUDA and ``nvidia-ml-py``; Beam's peer needs ``apache-beam`` (skipped, with the reason,
without it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from modelshare import memory
from modelshare.memory import Peak

from ..models import MiB, torch_input, torch_mlp
from . import workers


def _used() -> int:
    return memory.gpus()[0].used


def _settle(baseline: int, seconds: float = 30.0) -> int:
    """Wait until the GPU's used memory is back near ``baseline`` (processes and keepers gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _used() > baseline + 8 * MiB:
        time.sleep(0.1)
    time.sleep(0.5)
    return _used()


def receive(results: Any, procs: list[Any], timeout: float = 180.0) -> Any:
    """The next message from the workers; raises at once if one of them died (a CUDA error, say)
    instead of waiting out the timeout -- GPU time is short."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker {dead[0].pid} died with exit code {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no word from the workers in {timeout:.0f} s") from None


def bare_process_bytes(width: int, batch: int) -> int:
    """NVML's figure for a bare CUDA process (see ``workers.bare_cuda_worker``)."""
    ctx = multiprocessing.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=workers.bare_cuda_worker, args=(width, batch, results, done))
    proc.start()
    receive(results, [proc])
    time.sleep(0.5)
    figure = memory.gpus()[0].processes.get(proc.pid, 0)
    done.set()
    proc.join(60)
    return figure


def run_set(approach: str, path: str, directory: str, x: Any, processes: int, calls: int,
            kill_loader: bool = False) -> dict[str, Any]:
    """N processes of ``approach``: timed calls, GPU memory, outputs; with ``kill_loader``, the
    process that loaded is SIGKILLed while the others compute."""
    ctx = multiprocessing.get_context("spawn")
    results, start, done = ctx.Queue(), ctx.Event(), ctx.Event()
    baseline = _used()
    procs = [ctx.Process(target=workers.compute_worker,
                         args=(approach, path, directory, x, calls, results, start, done)) for _ in range(processes)]
    with Peak(_used, every=0.02) as peak:
        for proc in procs:
            proc.start()
        try:
            row = _measure(approach, procs, results, start, baseline, calls, kill_loader, directory)
        finally:
            done.set()
            start.set()
            for proc in procs:
                proc.join(60)
                if proc.exitcode is None:
                    proc.kill()
    row["peak_used_mib"] = (peak.value - baseline) / MiB
    row["after_exit_mib"] = (_settle(baseline) - baseline) / MiB
    return row


def _measure(approach: str, procs: list[Any], results: Any, start: Any, baseline: int, calls: int,
             kill_loader: bool, directory: str) -> dict[str, Any]:
    """The timed part of ``run_set``, while the workers run."""
    processes = len(procs)
    began = time.perf_counter()
    ready = [receive(results, procs) for _ in procs]
    load_seconds = time.perf_counter() - began
    start.set()
    began = time.perf_counter()
    timed: list[Any] = []
    while len(timed) < len(procs):  # a fast worker's "running" reports may come before the others' "timed"
        message = receive(results, procs)
        if message[0] == "timed":
            timed.append(message)
    wall = time.perf_counter() - began
    while True:  # skip the "running" reports that came in meanwhile
        try:
            results.get_nowait()
        except queue.Empty:
            break
    gpu = memory.gpus()[0]
    pids = [p.pid for p in procs]
    row: dict[str, Any] = {
        "approach": approach, "processes": processes, "calls": calls * processes,
        "calls_per_s": calls * processes / wall, "load_s": load_seconds,
        "loaders": sum(1 for r in ready if r[2]), "outputs_consistent": all(t[3] for t in timed),
        "used_mib": (gpu.used - baseline) / MiB,
        "per_process_mib": {str(pid): gpu.processes.get(pid, 0) / MiB for pid in pids},
        "first_output": ready[0][3],
    }
    if approach == "modelshare":
        row["gpu_usage_mib"] = memory.gpu_usage(pids, 0, directory) / MiB
        row["copies"] = [c.__dict__ for c in _list_copies(directory)]
    if kill_loader:
        row.update(_kill_the_loader(ready, procs, results))
    return row


def _list_copies(directory: str) -> list[Any]:
    from modelshare import list_gpu_copies as list_device_copies

    return list_device_copies(Path(directory))


def _kill_the_loader(ready: list[Any], procs: list[Any], results: Any) -> dict[str, Any]:
    loader = next(r[1] for r in ready if r[2])
    os.kill(loader, signal.SIGKILL)
    killed_at = time.monotonic()
    seen: dict[int, tuple[int, bool]] = {}
    survivors = {p.pid for p in procs} - {loader}
    while time.monotonic() - killed_at < 5.0:
        try:
            kind, pid, count, same = results.get(timeout=1.0)
        except queue.Empty:
            continue
        if kind == "running" and pid in survivors:
            total, ok = seen.get(pid, (0, True))
            seen[pid] = (total + count, ok and same)
    return {"killed_loader": loader, "survivors": len(survivors),
            "survivor_calls_after_kill": {str(pid): seen.get(pid, (0, False))[0] for pid in survivors},
            "survivors_correct": all(seen.get(pid, (0, False))[1] for pid in survivors),
            "survivors_kept_computing": all(seen.get(pid, (0, False))[0] > 0 for pid in survivors)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per process")
    parser.add_argument("--approaches", nargs="+", default=list(workers.APPROACHES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import torch

    if not memory.gpus() or not torch.cuda.is_available():
        print("benchmarks.gpu needs a GPU, torch with CUDA and nvidia-ml-py", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="modelshare-gpu-"))
    directory = Path("/dev/shm") / f"modelshare-gpu-bench-{os.getpid()}"
    directory.mkdir(mode=0o700)
    path = str(work / "mlp.pt")
    torch.save(torch_mlp(args.size_mib, args.width), path)
    weights = os.path.getsize(path)
    x = torch_input(args.width, args.batch)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "weights_mib": weights / MiB, "processes": args.processes, "batch": args.batch,
                              "command": " ".join(["python -m benchmarks.gpu", *(argv or sys.argv[1:])])}
    started_at = _used()

    def save() -> None:  # after every stage: what ran comes back even if a later stage hangs
        (args.out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))

    report["bare_process_mib"] = bare_process_bytes(args.width, args.batch) / MiB
    bound = (weights + args.processes * report["bare_process_mib"] * MiB) * 1.10 / MiB
    report["modelshare_bound_mib"] = bound
    try:
        crash = run_set("modelshare", path, str(directory), x, args.processes, 10, kill_loader=True)
        crash.pop("first_output")
    except Exception as exc:  # reported; the runs below still say what works
        crash = {"error": f"{type(exc).__name__}: {exc}"}
    report["crash"] = crash
    save()
    rows, reference = [], None
    report["runs"] = rows
    for approach in args.approaches:  # Beam's last: the one that may not be installed
        try:
            row = run_set(approach, path, str(directory), x, args.processes, args.calls)
        except Exception as exc:  # Beam missing, say: report it and go on with the others
            rows.append({"approach": approach, "error": f"{type(exc).__name__}: {exc}"})
            save()
            continue
        first = row.pop("first_output")
        reference = first if reference is None else reference
        row["outputs_equal_first_approach"] = bool(torch.equal(first, reference))
        rows.append(row)
        save()
    report["back_to_start_mib"] = (_settle(started_at) - started_at) / MiB
    save()
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2, default=str))
    print("\n| approach | calls/s | GPU used above start (peak) | per process | loaders | outputs equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['approach']} | {row['error']} | | | | |")
            continue
        per = ", ".join(f"{v:.0f}" for v in row["per_process_mib"].values())
        print(f"| {row['approach']} | {row['calls_per_s']:.1f} | {row['used_mib']:.0f} MiB ({row['peak_used_mib']:.0f})"
              f" | {per} MiB | {row['loaders']} | {row['outputs_equal_first_approach']} |")
    print(f"\nbound for modelshare: {bound:.0f} MiB (weights {weights / MiB:.0f} + {args.processes} x bare "
          f"{report['bare_process_mib']:.0f} MiB, +10%); after everything: {report['back_to_start_mib']:+.0f} MiB")
    return 0


