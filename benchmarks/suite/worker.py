"""One worker process of a benchmark run: ``python -m benchmarks.suite.worker SPEC_JSON INDEX``.

Its threads each get the model through the run's approach, run one inference (time to first
inference counts from the moment the suite launched the workers: interpreter start, imports and
the model's load or attach included), then time ``calls`` more. The worker writes its results
(``worker-INDEX.json``, and its first output as ``output-INDEX.npy``) and then stays alive until
the suite writes ``release``: every process of the run is measured while all of them hold the
model, and Beam's model server, which lives under the first worker, outlives every caller.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..frameworks import FRAMEWORKS
from .approaches import APPROACHES, STATS, RunSpec

RELEASE = "release"


def _thread(spec: RunSpec, first_call: int, results: list[dict[str, Any]], outputs: list[Any],
            errors: list[BaseException], held: list[Any]) -> None:
    try:
        framework = FRAMEWORKS[spec.framework]
        x = framework.sample()
        infer = APPROACHES[spec.approach](spec)
        held.append(infer)  # a serving thread keeps its model: the process holds every thread's until released
        outputs.append(np.asarray(infer(first_call, x)))
        first = time.time() - spec.launched_at
        latencies, start = [], time.time()
        for i in range(first_call + 1, first_call + spec.calls + 1):
            t = time.perf_counter()
            infer(i, x)
            latencies.append((time.perf_counter() - t) * 1000)
        results.append({"first_inference_s": first, "calls_start": start, "calls_end": time.time(),
                        "latencies_ms": latencies})
    except BaseException as exc:  # reported by the suite as this run's failure
        errors.append(exc)


def main(spec_path: str, index: int) -> int:
    suite = os.getppid()
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    # The framework is imported up front, as a serving process does (Beam's handler modules import
    # theirs), by every approach alike. Imported lazily, by the unpickling, it comes after the wait
    # in an attaching worker: the attachers import scikit-learn together once the publisher has
    # loaded, where every peer process imports it from the start (1-2 s later to a first inference).
    importlib.import_module(FRAMEWORKS[spec.framework].module)
    run_dir = Path(spec.run_dir)
    results: list[dict[str, Any]] = []
    outputs: list[Any] = []
    errors: list[BaseException] = []
    held: list[Any] = []
    threads = [threading.Thread(target=_thread, args=(spec, index * 1_000_000 + t * 10_000, results, outputs, errors,
                                                      held))
               for t in range(spec.threads)]  # every call has an index of its own: keyed approaches pick by it
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    np.save(run_dir / f"output-{index}.npy", outputs[0])
    stats: dict[str, int] = {}
    for report in STATS:
        stats.update(report())
    record = {"pid": os.getpid(), "threads": results, "stats": stats}
    (run_dir / f"worker-{index}.json.tmp").write_text(json.dumps(record))
    os.replace(run_dir / f"worker-{index}.json.tmp", run_dir / f"worker-{index}.json")
    while not (run_dir / RELEASE).exists():
        if os.getppid() != suite:  # the suite is gone: nobody will release us
            return 1
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
