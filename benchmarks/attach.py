"""Attach vs. private load: N fresh processes each get one model, privately or through modelshare.

For each approach, N spawned worker processes, one at a time (so that they do not fight over the
cores), obtain the model, run a first inference and time ``calls`` more; then all of them wait,
alive, while the parent samples their PSS:

* ``private``: every process loads the model file itself (``pickle.load``) -- what a worker pool
  or Beam's default does: N copies;
* ``modelshare``: the model is published once (timed as ``publish``); every process attaches
  with ``SharedModel.acquire()`` -- zero-copy views of one segment.

Reported per approach: time to obtain the model and to the first inference (median over
workers), per-call latency p50/p90 and its ratio to private, the N processes' total PSS, and
whether every output equals the private one. Because per-call times drift between processes on
a small machine, the per-call ratio is also measured in one fresh process that holds both a
private copy and shared views and alternates calls between them. Speed is compared as ratios
within one run.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from modelshare import SharedModel, memory

from .models import MiB, numpy_mlp, sample_input


@dataclass
class ApproachResult:
    """What one approach measured over its N workers."""

    approach: str
    processes: int
    obtain_s: float
    first_inference_s: float
    call_p50_ms: float
    call_p90_ms: float
    total_pss_mib: float
    outputs_equal: bool
    publish_s: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _load_file(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def _worker(approach: str, source: Any, x: np.ndarray, calls: int, started: Any, timing: Any, results: Any,
            done: Any) -> None:
    started.wait()  # every process has started up: none is importing while another measures
    with timing:  # one process at a time on the cores: each measures what a lone new process sees
        start = time.perf_counter()
        model = _load_file(source) if approach == "private" else source.acquire()
        obtained = time.perf_counter() - start
        out = model(x)
        first = time.perf_counter() - start
        latencies = []
        for _ in range(calls):
            t = time.perf_counter()
            model(x)
            latencies.append(time.perf_counter() - t)
    results.put({"pid": os.getpid(), "obtain": obtained, "first": first, "latencies": latencies, "out": out})
    done.wait()
    if approach != "private":
        source.release(model)


def _alternating_worker(path: str, shared: SharedModel, x: np.ndarray, calls: int, results: Any) -> None:
    private, model = _load_file(path), shared.acquire()
    private(x), model(x)  # warm both: first-touch costs are reported as time to first inference
    times: dict[str, list[float]] = {"private": [], "modelshare": []}
    for _ in range(calls):
        for name, m in (("private", private), ("modelshare", model)):
            t = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(v) for name, v in times.items()}
    # each pair of calls ran back to back, so their ratio cancels most of the machine's drift
    medians["paired_ratio"] = statistics.median(s / p for s, p in zip(times["modelshare"], times["private"]))
    results.put(medians)
    shared.release(model)


def per_call_ratio(path: str, shared: SharedModel, x: np.ndarray, calls: int) -> dict[str, float]:
    """Median call time on shared views and on a private copy, alternating in one fresh process."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    proc = spawn.Process(target=_alternating_worker, args=(path, shared, x, calls, results), daemon=True)
    proc.start()
    medians = results.get(timeout=1800)
    proc.join(120)
    return medians


def _run_workers(approach: str, source: Any, x: np.ndarray, processes: int, calls: int,
                 expected: np.ndarray) -> ApproachResult:
    spawn = multiprocessing.get_context("spawn")
    started, timing, results, done = spawn.Barrier(processes), spawn.Lock(), spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=_worker, args=(approach, source, x, calls, started, timing, results, done),
                           daemon=True)
             for _ in range(processes)]
    for p in procs:
        p.start()
    got = [results.get(timeout=1800) for _ in procs]
    pss = memory.total_pss(r["pid"] for r in got)
    done.set()
    for p in procs:
        p.join(120)
    latencies = sorted(t for r in got for t in r["latencies"])
    return ApproachResult(
        approach=approach,
        processes=processes,
        obtain_s=statistics.median(r["obtain"] for r in got),
        first_inference_s=statistics.median(r["first"] for r in got),
        call_p50_ms=1e3 * latencies[len(latencies) // 2],
        call_p90_ms=1e3 * latencies[int(len(latencies) * 0.9)],
        total_pss_mib=pss / MiB,
        outputs_equal=all(np.array_equal(r["out"], expected) for r in got),
    )


def run(size_mib: int = 256, processes: int = 4, calls: int = 30, width: int = 4096) -> list[ApproachResult]:
    """Measure both approaches on a generated ``size_mib`` MiB model; returns one result each."""
    x = sample_input(width)
    loader = _GeneratedModel(size_mib, width)
    with tempfile.TemporaryDirectory(prefix="modelshare-bench-") as files, \
            tempfile.TemporaryDirectory(prefix="modelshare-bench-", dir="/dev/shm") as segments:
        model = loader()
        expected = model(x)
        path = os.path.join(files, "model.pkl")
        with open(path, "wb") as f:
            pickle.dump(model, f, protocol=5)
        del model
        private = _run_workers("private", path, x, processes, calls, expected)

        shared = SharedModel(loader, key=f"bench-mlp-{size_mib}", share="processes", directory=segments)
        start = time.perf_counter()
        holder = shared.acquire()  # publish once; this process holds it and never touches the weights
        publish = time.perf_counter() - start
        try:
            result = _run_workers("modelshare", shared, x, processes, calls, expected)
            alternating = per_call_ratio(path, shared, x, calls)
        finally:
            shared.release(holder)
        result.publish_s = publish
    for r in (private, result):
        r.extra["per_call_vs_private"] = r.call_p50_ms / private.call_p50_ms
        r.extra["alternating_call_ms"] = 1e3 * alternating[r.approach]
        r.extra["obtain_speedup_vs_private"] = private.obtain_s / r.obtain_s
        r.extra["first_inference_speedup_vs_private"] = private.first_inference_s / r.first_inference_s
    result.extra["paired_ratio_vs_private"] = alternating["paired_ratio"]
    return [private, result]


class _GeneratedModel:
    """A picklable loader of a generated MLP (a class, so the fingerprint sees its size)."""

    def __init__(self, size_mib: int, width: int) -> None:
        self.size_mib, self.width = size_mib, width

    def __call__(self) -> Any:
        return numpy_mlp(self.size_mib, self.width)


def as_markdown(results: list[ApproachResult], size_mib: int) -> str:
    """A Markdown table of the results."""
    lines = [
        f"Model: {size_mib} MiB numpy MLP, {results[0].processes} spawned processes",
        "",
        "| approach | get model (median) | first inference | speedup to first inference | per call p50 | p90 | "
        "per call vs private | total PSS | outputs equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.approach} | {r.obtain_s * 1e3:.1f} ms | {r.first_inference_s * 1e3:.0f} ms | "
            f"{r.extra['first_inference_speedup_vs_private']:.1f}x | {r.call_p50_ms:.2f} ms | "
            f"{r.call_p90_ms:.2f} ms | "
            f"{r.extra['per_call_vs_private']:.3f}x | {r.total_pss_mib:.0f} MiB | "
            f"{'yes' if r.outputs_equal else 'NO'} |"
        )
    shared = results[-1]
    lines.append("")
    lines.append(f"modelshare: published once in {shared.publish_s:.2f} s; attach is "
                 f"{shared.extra['obtain_speedup_vs_private']:.0f}x faster than a private load.")
    lines.append(f"Per call, one process alternating between a private copy and shared views: "
                 f"{results[0].extra['alternating_call_ms']:.2f} ms vs {shared.extra['alternating_call_ms']:.2f} ms "
                 f"(median of paired ratios {shared.extra['paired_ratio_vs_private']:.3f}x).")
    return "\n".join(lines)


def to_json(results: list[ApproachResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
