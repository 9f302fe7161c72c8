"""The suite's output: a JSON file per run, a Markdown table, and PNG plots in a results folder.

Plots (matplotlib, the ``bench`` extra; skipped with a note where it is missing):
``memory-over-time-<N>p.png`` -- memory in use over time per approach, with the limit;
``peak-vs-processes.png`` -- peak memory in use against the number of processes, per approach,
beside the floor of that many bare workers, when a run covered more than one process count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .approaches import LABELS
from .run import RunResult


def _fmt(value: object, pattern: str) -> str:
    return "--" if value is None else pattern.format(value)


def markdown(results: Sequence[RunResult]) -> str:
    """One row per run: survival, peak memory against the limit, speed, correctness."""
    first = results[0]
    enforced = "enforced by a memory cgroup" if first.limit_enforced else "NOT enforced (no cgroup): peaks compared"
    lines = [f"Scenario {first.scenario}: {first.framework} model of {first.model_mib:.0f} MiB, "
             f"{first.threads} thread(s) per process; limit {first.limit_mib:.0f} MiB, {enforced}; a bare worker "
             f"process costs {first.bare_mib:.0f} MiB. In use = anonymous + shared memory (what the kernel cannot "
             "reclaim); PSS = the workers' total, at its peak and once every worker holds the model.", "",
             "| approach | processes | result | peak in use (limit) | PSS peak (held) | first inference | calls/s | "
             "latency p50 / p99 | outputs |" + (" loads, hits, evictions |" if any(r.stats for r in results) else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if any(r.stats for r in results) else "")]
    for r in results:
        outputs = {True: "identical", False: "DIFFER", None: "--"}[r.outputs_equal]
        result = r.status + (f" ({r.error})" if r.status == "failed" and r.error else "")
        latency = (f"{r.latency_ms['p50']:.1f} / {r.latency_ms['p99']:.1f} ms" if r.latency_ms else "--")
        counters = ", ".join(f"{v} {k}" for k, v in sorted(r.stats.items()))
        lines.append(f"| {LABELS.get(r.approach, r.approach)} | {r.processes} | {result} | "
                     f"{r.peak_in_use_mib:.0f} ({r.limit_mib:.0f}) MiB | {r.peak_pss_mib:.0f}"
                     f"{f' ({r.held_pss_mib:.0f})' if r.held_pss_mib is not None else ''} MiB | "
                     f"{_fmt(r.first_inference_s, '{:.2f} s')} | {_fmt(r.calls_per_s, '{:.1f}')} | {latency} | "
                     f"{outputs} |" + (f" {counters} |" if any(x.stats for x in results) else ""))
    return "\n".join(lines)


def write(results: Sequence[RunResult], out: Path) -> list[Path]:
    """Write JSON per run, the Markdown table and the plots under ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        path = out / f"scenario{r.scenario}-{r.framework}-{r.approach}-{r.processes}p.json"
        path.write_text(json.dumps(r.to_json(), indent=1))
        written.append(path)
    table = out / "results.md"
    table.write_text(markdown(results) + "\n")
    written.append(table)
    return written + plot(results, out)


def plot(results: Sequence[RunResult], out: Path) -> list[Path]:
    """The PNG plots; none (and a note on stderr) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("[benchmarks] matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    written = []
    for processes in sorted({r.processes for r in results}):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        runs = [r for r in results if r.processes == processes]
        for r in runs:
            t = [point[0] for point in r.timeline]
            ax.plot(t, [point[1] for point in r.timeline], label=f"{LABELS.get(r.approach, r.approach)}: {r.status}")
        ax.axhline(runs[0].limit_mib, color="red", linestyle="--", label="limit")
        ax.set(xlabel="seconds", ylabel="memory in use: anonymous + shared (MiB)",
               title=f"Scenario {runs[0].scenario}, {runs[0].framework} {runs[0].model_mib:.0f} MiB, "
                     f"{processes} processes")
        ax.legend(fontsize=8)
        path = out / f"memory-over-time-{processes}p.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    counts = sorted({r.processes for r in results})
    if len(counts) > 1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for approach in dict.fromkeys(r.approach for r in results):
            runs = sorted((r for r in results if r.approach == approach), key=lambda r: r.processes)
            ax.plot([r.processes for r in runs], [r.peak_in_use_mib for r in runs], marker="o",
                    label=LABELS.get(approach, approach))
            for r in runs:
                if r.status == "oom-killed":
                    ax.annotate("OOM", (r.processes, r.peak_in_use_mib), textcoords="offset points", xytext=(4, 4),
                                fontsize=8, color="red")
        ax.plot(counts, [n * results[0].bare_mib for n in counts], color="grey", linestyle=":",
                label="bare workers only")
        ax.set(xlabel="worker processes", ylabel="peak memory in use (MiB)", xticks=counts,
               title=f"Scenario {results[0].scenario}: peak memory vs. processes "
                     f"({results[0].framework} {results[0].model_mib:.0f} MiB)")
        ax.legend(fontsize=8)
        path = out / "peak-vs-processes.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
