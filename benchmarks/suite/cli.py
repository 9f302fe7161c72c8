"""``python -m benchmarks``: the memory scenarios under a real memory limit, side by side with Beam.

Scenarios:
  1  a small model, one per process, shared by its threads (private per thread vs. Beam's
     ``Shared`` vs. modelshare ``share="threads"``)
  2  6 keyed models with room for 2 (Beam's ``KeyedModelHandler(max_models_per_worker_hint=2)``
     vs. modelshare's ``ModelRouter`` under a byte budget)
  3  one large model shared by all processes (Beam's default vs. Beam's ``large_model=True``
     ``MultiProcessShared`` vs. modelshare) -- the default: a 512 MiB PyTorch model, 4 processes
  4  exactly 2 model instances for all the processes (Beam's default vs. Beam's
     ``model_copies=2`` vs. modelshare ``share="server", copies=2``)

Each approach runs in its own memory cgroup, limited so that private copies cannot fit; prints a
Markdown table and writes JSON per run, ``results.md`` and PNG plots to ``--out``. Other
benchmarks (``benchmarks/studies/``): ``python -m benchmarks.studies.attach`` (attach vs. private load),
``benchmarks.studies.beam_pipeline`` (real Beam pipelines), ``benchmarks.studies.keyed_pipeline``,
``benchmarks.studies.server_calls``, ``benchmarks.studies.alignment_probe``, ``benchmarks.studies.onnx_prepack``;
on a GPU machine ``benchmarks/gpu/check.sh``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from ..cgroup import unavailable_reason
from ..models import MiB
from . import report, scenarios
from .approaches import APPROACHES, why_not
from .run import (
    SCRATCH_PREFIX,
    RunResult,
    bare_worker_bytes,
    compile_bytecode,
    prepare_model,
    run_one,
    sweep_leftovers,
)


class _Progress:
    """One line per run on stderr, updated in place on a terminal."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()
        self.label = ""

    def start(self, label: str) -> None:
        self.done += 1
        self.label = f"[{self.done}/{self.total}] {label}"
        print(self.label + " ...", end="\r" if self.tty else "\n", file=sys.stderr, flush=True)

    def update(self, text: str) -> None:
        if self.tty:
            print(f"{self.label} ... {text}\033[K", end="\r", file=sys.stderr, flush=True)

    def finish(self, r: RunResult) -> None:
        speed = f", {r.calls_per_s:.1f} calls/s" if r.calls_per_s else ""
        line = f"{self.label}: {r.status}, peak {r.peak_in_use_mib:.0f} MiB in use{speed} ({r.wall_s:.0f} s)"
        print(line + ("\033[K" if self.tty else ""), file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", type=int, default=3, choices=scenarios.numbers())
    parser.add_argument("--framework", default="torch", choices=["torch", "safetensors", "onnx", "sklearn", "numpy"])
    parser.add_argument("--size-mib", type=int, default=512, help="model size (default %(default)s)")
    parser.add_argument("--processes", type=int, nargs="+", default=[4],
                        help="worker processes; several values plot peak memory against them (default 4)")
    parser.add_argument("--threads", type=int, help="threads per process (default: the scenario's)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per thread (default %(default)s)")
    parser.add_argument("--limit-mib", type=int,
                        help="memory limit per run (default: the scenario's, from the model and a bare worker)")
    parser.add_argument("--approaches", nargs="+", choices=sorted(APPROACHES), help="default: the scenario's")
    parser.add_argument("--no-cgroup", action="store_true", help="do not enforce the limit; compare peaks to it")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default %(default)s)")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (cgroups, segments) when terminated
    sweep_leftovers()
    compile_bytecode()
    scenario = scenarios.get(args.scenario)
    threads = args.threads or scenario.threads
    approaches = [a for a in args.approaches or scenario.approaches if why_not(a, args.framework) is None]
    for approach in args.approaches or scenario.approaches:
        if (reason := why_not(approach, args.framework)) is not None:
            print(f"[benchmarks] {approach} does not run here: {reason}", file=sys.stderr)
    use_cgroup = not args.no_cgroup
    if use_cgroup and (reason := unavailable_reason()) is not None:
        print(f"[benchmarks] no memory limit can be enforced here: {reason}. Peaks are measured and compared "
              "to the limit instead.", file=sys.stderr)
        use_cgroup = False
    out = args.out / f"scenario{scenario.number}-{args.framework}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[benchmarks] scenario {scenario.number} ({scenario.title}): generating a {args.size_mib} MiB "
          f"{args.framework} model ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-model-") as folder:
        model = prepare_model(args.framework, args.size_mib, Path(folder))
        bare = bare_worker_bytes(args.framework, use_cgroup)
        print(f"[benchmarks] model file {model.nbytes / MiB:.0f} MiB; a bare worker process costs "
              f"{bare / MiB:.0f} MiB", file=sys.stderr, flush=True)
        progress = _Progress(len(approaches) * len(args.processes))
        results = []
        for processes in args.processes:
            limit = (args.limit_mib * MiB if args.limit_mib
                     else scenario.default_limit(model.nbytes, processes, threads, bare))
            for approach in approaches:
                progress.start(f"{approach}, {processes} processes x {threads} threads, limit {limit / MiB:.0f} MiB")
                result = run_one(scenario, approach, model, processes, threads, args.calls, limit, use_cgroup,
                                 progress.update, bare=bare)
                progress.finish(result)
                results.append(result)
    print(report.markdown(results))
    written = report.write(results, out)
    print(f"\n[benchmarks] wrote {len(written)} files to {out}", file=sys.stderr)
    # the exit status checks the scenario's claim, which holds at the limit sized for it; under a limit
    # given with --limit-mib, being OOM-killed is a result to read in the table, not a failure
    survivors = [r for r in results if r.approach in scenario.must_survive and not args.limit_mib]
    return 0 if all(r.status == "completed" and r.outputs_equal for r in survivors) else 1

