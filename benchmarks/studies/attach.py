"""Attach vs. private load: N fresh processes each get one model, privately or through modelshare.

Runs for any framework in ``frameworks.FRAMEWORKS`` (numpy, torch, onnx, sklearn). The suite
generates a model of the asked size and saves it in the framework's own format; then, for each
approach, N spawned worker processes, one at a time (so that they do not fight over the cores),
obtain the model, run a first inference and time ``calls`` more, and all of them wait, alive,
while the parent samples their PSS:

* ``private``: every process loads the file itself (``pickle.load``, ``torch.load``, an ONNX
  Runtime session on the file) -- what a worker pool or Beam's default does: N copies;
* ``modelshare``: the same file is loaded once (timed as ``publish``); every process attaches
  with ``SharedModel.acquire()`` -- zero-copy views of one segment.

Reported per approach: time to obtain the model and to the first inference (median over
workers), per-call latency p50/p90 and its ratio to private, the N processes' total PSS, and
whether every output equals the private one. Because per-call times drift between processes on
a small machine, the per-call ratio is also measured in one fresh process that holds both a
private copy and shared views and alternates calls between them. Speed is compared as ratios
within one run.

Run: ``python -m benchmarks.studies.attach [--framework numpy|torch|onnx|onnx-prepack|sklearn] [--size-mib 256]
[--processes 4]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from modelshare import SharedModel, memory

from ..frameworks import FRAMEWORKS, Framework
from ..models import MiB


@dataclass
class ApproachResult:
    """What one approach measured over its N workers."""

    approach: str
    framework: str
    processes: int
    obtain_s: float
    first_inference_s: float
    first_call_s: float
    call_p50_ms: float
    call_p90_ms: float
    total_pss_mib: float
    outputs_equal: bool
    publish_s: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


def _obtain(framework: Framework, approach: str, source: Any) -> Any:
    return framework.load(source) if approach == "private" else source.acquire()


def _worker(name: str, approach: str, source: Any, calls: int, started: Any, timing: Any, results: Any,
            done: Any) -> None:
    framework = FRAMEWORKS[name]
    importlib.import_module(framework.module)  # import time is not load time, for either approach
    x = framework.sample()
    started.wait()  # every process has started up: none is importing while another measures
    with timing:  # one process at a time on the cores: each measures what a lone new process sees
        start = time.perf_counter()
        model = _obtain(framework, approach, source)
        obtained = time.perf_counter() - start
        out = framework.call(model, x)
        first = time.perf_counter() - start
        latencies = []
        for _ in range(calls):
            t = time.perf_counter()
            framework.call(model, x)
            latencies.append(time.perf_counter() - t)
    results.put({"pid": os.getpid(), "obtain": obtained, "first": first, "latencies": latencies, "out": out})
    done.wait()
    if approach != "private":
        source.release(model)


def _alternating_worker(name: str, path: Path, shared: SharedModel, calls: int, results: Any) -> None:
    framework = FRAMEWORKS[name]
    x = framework.sample()
    private, model = framework.load(path), shared.acquire()
    framework.call(private, x), framework.call(model, x)  # warm both: first-touch costs are reported above
    times: dict[str, list[float]] = {"private": [], "modelshare": []}
    for _ in range(calls):
        for approach, m in (("private", private), ("modelshare", model)):
            t = time.perf_counter()
            framework.call(m, x)
            times[approach].append(time.perf_counter() - t)
    medians = {approach: statistics.median(v) for approach, v in times.items()}
    # each pair of calls ran back to back, so their ratio cancels most of the machine's drift
    medians["paired_ratio"] = statistics.median(s / p for s, p in zip(times["modelshare"], times["private"]))
    results.put(medians)
    shared.release(model)


def per_call_ratio(name: str, path: Path, shared: SharedModel, calls: int) -> dict[str, float]:
    """Median call time on shared views and on a private copy, alternating in one fresh process."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    proc = spawn.Process(target=_alternating_worker, args=(name, path, shared, calls, results), daemon=True)
    proc.start()
    medians = results.get(timeout=1800)
    proc.join(120)
    return medians


def _run_workers(name: str, approach: str, source: Any, processes: int, calls: int, expected: Any) -> ApproachResult:
    spawn = multiprocessing.get_context("spawn")
    started, timing, results, done = spawn.Barrier(processes), spawn.Lock(), spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=_worker, args=(name, approach, source, calls, started, timing, results, done),
                           daemon=True) for _ in range(processes)]
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
        framework=name,
        processes=processes,
        obtain_s=statistics.median(r["obtain"] for r in got),
        first_inference_s=statistics.median(r["first"] for r in got),
        first_call_s=statistics.median(r["first"] - r["obtain"] for r in got),
        call_p50_ms=1e3 * latencies[len(latencies) // 2],
        call_p90_ms=1e3 * latencies[int(len(latencies) * 0.9)],
        total_pss_mib=pss / MiB,
        outputs_equal=all(FRAMEWORKS[name].equal(r["out"], expected) for r in got),
    )


def run(size_mib: int = 256, processes: int = 4, calls: int = 30, framework: str = "numpy",
        segments_in: Path = Path("/dev/shm")) -> list[ApproachResult]:
    """Measure both approaches on a generated ``size_mib`` MiB model; returns one result each.
    ``segments_in``: the tmpfs the segment directory is made in (one mounted ``huge=``, say)."""
    fw = FRAMEWORKS[framework]
    with tempfile.TemporaryDirectory(prefix="modelshare-bench-") as files, \
            tempfile.TemporaryDirectory(prefix="modelshare-bench-", dir=segments_in) as segments:
        path = Path(files) / f"model.{framework}"
        fw.save(fw.build(size_mib), path)
        expected = fw.call(fw.load(path), fw.sample())
        private = _run_workers(framework, "private", path, processes, calls, expected)

        shared = fw.shared(path, f"bench-{framework}-{size_mib}", Path(segments))
        start = time.perf_counter()
        holder = shared.acquire()  # publish once; this process holds it and never touches the weights
        publish = time.perf_counter() - start
        try:
            result = _run_workers(framework, "modelshare", shared, processes, calls, expected)
            alternating = per_call_ratio(framework, path, shared, calls)
        finally:
            shared.release(holder)
        result.publish_s = publish
    for r in (private, result):
        r.extra["per_call_vs_private"] = r.call_p50_ms / private.call_p50_ms
        r.extra["alternating_call_ms"] = 1e3 * alternating[r.approach]
        r.extra["obtain_speedup_vs_private"] = private.obtain_s / r.obtain_s
        r.extra["first_inference_speedup_vs_private"] = private.first_inference_s / r.first_inference_s
        r.extra["first_call_vs_private"] = r.first_call_s / private.first_call_s
    result.extra["paired_ratio_vs_private"] = alternating["paired_ratio"]
    return [private, result]


def as_markdown(results: list[ApproachResult], size_mib: int) -> str:
    """A Markdown table of the results."""
    lines = [
        f"Model: {size_mib} MiB {results[0].framework} model, {results[0].processes} spawned processes",
        "",
        "| approach | get model (median) | first inference | speedup to first inference | first call alone | "
        "per call p50 | p90 | per call vs private | total PSS | outputs equal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.approach} | {r.obtain_s * 1e3:.1f} ms | {r.first_inference_s * 1e3:.0f} ms | "
            f"{r.extra['first_inference_speedup_vs_private']:.1f}x | {r.first_call_s * 1e3:.1f} ms "
            f"({r.extra['first_call_vs_private']:.2f}x) | {r.call_p50_ms:.2f} ms | "
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.attach", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", default="numpy", choices=sorted(FRAMEWORKS),
                        help="which framework's generated model (default %(default)s)")
    parser.add_argument("--size-mib", type=int, default=256, help="model size (default %(default)s)")
    parser.add_argument("--processes", type=int, default=4, help="worker processes (default %(default)s)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per process (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default %(default)s)")
    parser.add_argument("--segments-in", type=Path, default=Path("/dev/shm"),
                        help="the tmpfs to put segments in (default %(default)s; a tmpfs mounted huge=within_size "
                             "maps them with 2 MiB pages)")
    args = parser.parse_args(argv)

    print(f"[benchmarks] attach: {args.size_mib} MiB {args.framework} model, {args.processes} processes ...",
          file=sys.stderr, flush=True)
    results = run(args.size_mib, args.processes, args.calls, args.framework, args.segments_in)
    table = as_markdown(results, args.size_mib)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"benchmark": "attach", "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "results": to_json(results)}
    (args.out / f"attach-{args.framework}-{stamp}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"attach-{args.framework}-{stamp}.md").write_text(table + "\n")
    return 0 if all(r.outputs_equal for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
