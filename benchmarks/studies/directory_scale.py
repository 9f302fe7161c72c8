"""A directory of 10,000 model versions where there were ten: how long a sweep, a routed load
(admission, eviction, load, publish; a router's first also builds the ledger), a routed hit and
``modelshare top --once`` take as the number of kept-warm segments grows. Every decision reads the
directory once, so each is linear in the number of files with a small constant.

Run: ``python -m benchmarks.studies.directory_scale [--counts 100 1000 10000]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def populate(directory: Path, count: int) -> None:
    """``count`` kept-warm segments of 4 KiB + 64 bytes, and ``count`` half-written files their
    writers left (what a sweep must remove), in a new ``directory``."""
    from modelshare._host.directory import SegmentName
    from modelshare._host.format import write_segment
    from modelshare.codecs import Encoded

    directory.mkdir(mode=0o700)
    encoded = Encoded(b"skeleton", [memoryview(np.zeros(64, dtype=np.uint8))])
    for i in range(count):
        name = SegmentName.for_model(directory, f"m{i}", f"{i:016x}")
        write_segment(name.seg_path, name.temporary_path(), {"key": f"m{i}", "codec": "generic",
                                                             "views": "read-only"}, encoded, keep_warm=True)
        name.temporary_path().write_bytes(b"half")


def _ones() -> dict:
    return {"w": np.ones(64, dtype=np.uint8)}


def measure(count: int) -> dict[str, float]:
    """Milliseconds for each operation on a directory of ``count`` segments."""
    from modelshare import Budget, ModelRouter, SharedModel, gc_segments, list_segments

    parent = Path(tempfile.mkdtemp(prefix="modelshare-scale-", dir="/dev/shm"))
    directory = parent / "d"
    try:
        populate(directory, count)
        started = time.perf_counter()
        gc_segments(directory)
        sweep = time.perf_counter() - started
        size = list_segments(directory)[0].nbytes
        router = ModelRouter(factory=lambda k: SharedModel(_ones, key=k, directory=directory),
                             budget=Budget(host=count * size), load_overhead=1.0)
        timings = []
        for key in ("new", "new2", "new2"):  # the first load builds the ledger from the segments
            started = time.perf_counter()
            shared, model = router.acquire(key)  # admission evicts the least recently used
            timings.append(time.perf_counter() - started)
            shared.release(model)
            del model
        first_load, routed_load, routed_hit = timings
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(directory), "top", "--once"],
                       check=True, capture_output=True)
        top = time.perf_counter() - started
        gc_segments(directory, include_warm=True)
    finally:
        shutil.rmtree(parent)
    return {"segments": count, "sweep_ms": sweep * 1e3, "first_load_ms": first_load * 1e3,
            "routed_load_ms": routed_load * 1e3,
            "routed_hit_ms": routed_hit * 1e3, "top_once_ms": top * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    print("| segments | sweep | a router's first load | routed load | routed hit | `top --once` (a new process) |")
    print("|---|---|---|---|---|---|")
    for count in args.counts:
        row = measure(count)
        print(f"| {count:,} | {row['sweep_ms']:.0f} ms | {row['first_load_ms']:.0f} ms | "
              f"{row['routed_load_ms']:.0f} ms | "
              f"{row['routed_hit_ms']:.1f} ms | {row['top_once_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
