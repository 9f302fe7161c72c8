"""A process pool that is terminated and started again: the second pool adopts the model.

    python examples/pool_restart.py      # from the repository root

``Pool.terminate()`` kills the workers while they hold the model, leaving a complete segment with
no holder -- an orphan. The next pool's first acquire adopts it (its weights checked, not loaded
again). Prints one JSON line: loads, attaches, whether every answer is right in both pools, and
the segment's state between them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

from benchmarks.models import numpy_mlp
from examples.serving import WIDTH, request_input, shared
from modelshare.metrics import figures


def score(seed: int) -> float:
    """One task: the shared model's output for request ``seed`` (held between tasks by the linger)."""
    with shared.use() as model:
        return float(model(request_input(seed)).sum())


def main() -> None:
    private = numpy_mlp(int(os.environ.get("EXAMPLE_MODEL_MIB", "32")), WIDTH)
    expected = [float(private(request_input(i)).sum()) for i in range(32)]
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(4)
    right = [pool.map(score, range(32), chunksize=1) == expected]
    pool.map_async(score, range(1_000_000), chunksize=1)  # busy when terminated
    time.sleep(0.5)
    pool.terminate()  # SIGTERM: the workers die in the middle of their tasks, holding the model
    pool.join()
    between = [s.state for s in figures(shared.directory).segments]
    pool = spawn.Pool(4)
    right.append(pool.map(score, range(32), chunksize=1) == expected)
    pool.close()  # this time the workers finish and exit: their last release unlinks the segment
    pool.join()
    now = figures(shared.directory)
    print(json.dumps({"loads": now.count(shared.key, "loads"), "attaches": now.count(shared.key, "attaches"),
                      "right": right, "between": between}))


if __name__ == "__main__":
    main()
