"""A real keyed Beam pipeline under a memory cgroup: Beam's per-worker model count against
modelshare's machine-wide byte budget.

Six scikit-learn models (wide linear classifiers of ``--size-mib`` each, joblib files) serve six
keys; the
DirectRunner runs ``direct_num_workers`` SDK worker processes (``multi_processing``). Three runs,
each a fresh pipeline process inside its own memory cgroup:

1. ``baseline``: the same pipeline with 1 MiB models and no limit, to measure what the runner and
   its workers cost without the models (its peak);
2. ``beam-hint``: ``KeyedModelHandler(mappings, max_models_per_worker_hint=2)`` under a limit of
   the baseline + 2 models + 384 MiB: every worker keeps up to 2 private models;
3. ``modelshare-budget``: ``SharedModelHandler(KeyedModelHandler(mappings), budget=Budget(host=2
   models))`` under the same limit.

Reported: completed or OOM-killed, the cgroup's peak memory in use, wall time, and whether the
predictions equal the unwrapped handler's (from a run without a limit).

Run: ``python -m benchmarks.studies.keyed_pipeline [--size-mib 256] [--workers 4] [--examples 120]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from modelshare.memory import Peak

from .. import ROOT
from ..cgroup import MemoryCgroup
from ..models import MiB

KEYS, HELD = 6, 2

_PIPELINE = """
import json, pickle, sys
import numpy as np
import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, KeyModelMapping, RunInference
from apache_beam.ml.inference.sklearn_inference import ModelFileType, SklearnModelHandlerNumpy
from apache_beam.options.pipeline_options import PipelineOptions
folder, config, workers, examples, budget, out = sys.argv[1:7]
paths = sorted(p for p in __import__('os').listdir(folder) if p.endswith('.joblib'))
mappings = [KeyModelMapping([p[:-7]], SklearnModelHandlerNumpy(model_uri=folder + '/' + p,
                                                               model_file_type=ModelFileType.JOBLIB)) for p in paths]
if config == 'beam-hint':
    handler = KeyedModelHandler(mappings, max_models_per_worker_hint=%d)
elif config == 'modelshare-budget':
    from beam_adapter import SharedModelHandler
    from modelshare import Budget
    handler = SharedModelHandler(KeyedModelHandler(mappings), budget=Budget(host=int(budget)))
else:
    handler = KeyedModelHandler(mappings)
rng = np.random.default_rng(0)
width = int(np.load(folder + '/width.npy'))
data = [(paths[i %% len(paths)][:-7], rng.standard_normal(width)) for i in range(int(examples))]
with beam.Pipeline(options=PipelineOptions(direct_num_workers=int(workers),
                                           direct_running_mode='multi_processing')) as p:
    (p | beam.Create(data) | RunInference(handler)
       | beam.MapTuple(lambda k, r: json.dumps([k, float(r.example[0]), int(r.inference)]))
       | beam.io.WriteToText(out))
""" % HELD


def save_models(folder: Path, size_mib: int, width: int = 4096) -> None:
    """Six linear classifiers of ~``size_mib`` MiB as joblib files (coefficients differ per key)."""
    import joblib
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    classes = max(2, size_mib * MiB // (8 * width))
    rng = np.random.default_rng(0)
    for i in range(KEYS):
        model = LogisticRegression()
        model.coef_ = rng.standard_normal((classes, width))
        model.intercept_, model.classes_ = np.zeros(classes), np.arange(classes)
        joblib.dump(model, folder / f"k{i}.joblib")
    np.save(folder / "width.npy", np.array(width))


def run_pipeline(folder: Path, config: str, workers: int, examples: int, budget: int,
                 limit: Optional[int]) -> dict[str, Any]:
    """One pipeline in a fresh process inside its own cgroup: status, peak in use, wall time, outputs."""
    out = folder / f"out-{config}-{time.monotonic_ns()}"
    cgroup = MemoryCgroup.create(f"modelshare-bench-keyed-{config}-{time.monotonic_ns()}", limit or (64 << 30))
    segments = Path(tempfile.mkdtemp(prefix=f"modelshare-bench-{os.getpid()}-keyed-", dir="/dev/shm"))
    env = dict(os.environ, MODELSHARE_DIR=str(segments))  # this run's own segments, ledger and locks
    start = time.monotonic()
    try:
        with Peak(cgroup.in_use) as peak:
            proc = subprocess.run(cgroup.wrap([sys.executable, "-c", _PIPELINE, str(folder), config, str(workers),
                                               str(examples), str(budget), str(out)]), env=env, capture_output=True,
                                  text=True, cwd=ROOT, timeout=1800)
    finally:
        shutil.rmtree(segments, ignore_errors=True)
    wall = time.monotonic() - start
    oom_kills = cgroup.oom_kills()
    cgroup.remove()
    lines = sorted(json.loads(line) for f in folder.glob(out.name + "*") for line in f.read_text().splitlines())
    status = "oom-killed" if oom_kills else ("completed" if proc.returncode == 0 else "failed")
    return {"config": config, "status": status, "peak_in_use_mib": peak.value / MiB, "wall_s": wall,
            "oom_kills": oom_kills, "predictions": lines, "error": proc.stderr[-1500:] if status == "failed" else ""}


def run(size_mib: int = 256, workers: int = 4, examples: int = 120, directory: Optional[Path] = None) -> dict:
    """Baseline, then Beam's hint and modelshare's budget under the same limit; the unwrapped
    predictions (no limit) to compare with."""
    with tempfile.TemporaryDirectory(prefix="modelshare-bench-keyed-") as tmp:
        folder = Path(tmp)
        small, big = folder / "small", folder / "big"
        small.mkdir()
        big.mkdir()
        save_models(small, 1)
        save_models(big, size_mib)
        model_bytes = (big / "k0.joblib").stat().st_size
        budget = HELD * (model_bytes + (1 << 20))
        baseline = run_pipeline(small, "unwrapped", workers, examples, budget, None)
        limit = int(baseline["peak_in_use_mib"] * MiB) + HELD * model_bytes + (384 << 20)
        reference = run_pipeline(big, "unwrapped", workers, examples, budget, None)
        runs = [run_pipeline(big, config, workers, examples, budget, limit)
                for config in ("beam-hint", "modelshare-budget")]
    for r in runs:
        r["same_predictions"] = r["status"] == "completed" and r["predictions"] == reference["predictions"]
    return {"model_mib": model_bytes / MiB, "limit_mib": limit / MiB, "baseline_mib": baseline["peak_in_use_mib"],
            "budget_mib": budget / MiB, "runs": runs, "reference_count": len(reference["predictions"])}


def as_markdown(result: dict) -> str:
    lines = [f"6 keyed models of {result['model_mib']:.0f} MiB; the runner and workers alone peak at "
             f"{result['baseline_mib']:.0f} MiB; limit {result['limit_mib']:.0f} MiB (that + 2 models + 384 MiB); "
             f"modelshare's budget {result['budget_mib']:.0f} MiB.", "",
             "| configuration | result | peak in use | wall time | predictions as unwrapped |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        same = {True: "yes", False: "--" if r["status"] != "completed" else "NO"}[r["same_predictions"]]
        lines.append(f"| {r['config']} | {r['status']} | {r['peak_in_use_mib']:.0f} MiB | {r['wall_s']:.1f} s "
                     f"| {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=120)
    args = parser.parse_args()
    print(as_markdown(run(args.size_mib, args.workers, args.examples)))


if __name__ == "__main__":
    main()
