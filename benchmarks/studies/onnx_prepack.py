"""ONNX Runtime's prepacking, measured: per-call time and private memory, with and without it.

ORT's CPU MatMul repacks a constant weight into its kernel layout. With prepacking on (ORT's
default) that happens once, at session creation, into private memory: fast calls, a private copy
per process. With it off (modelshare's default, so that weights stay shared) the kernel packs
the weight on every call: no private copy, but each call pays for the packing, which matters most
for small batches. Each configuration runs in a fresh process on a session over a shared segment.

Run: ``python -m benchmarks.studies.onnx_prepack [--size-mib 128]``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from modelshare import SharedModel

from .. import ROOT
from ..models import onnx_mlp

_PROBE = """
import json, statistics, sys, time, pickle
from benchmarks.models import onnx_input
shared, batch, calls = pickle.loads(sys.stdin.buffer.read())
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) / 1024
before = anon()
session = shared.acquire()
x = onnx_input(batch=batch)
session.run(None, {'x': x})
grown = anon() - before
times = []
for _ in range(calls):
    t = time.perf_counter(); session.run(None, {'x': x}); times.append(time.perf_counter() - t)
print(json.dumps({'private_mib': grown, 'call_ms': 1e3 * statistics.median(times)}))
shared.release(session)
"""


def measure(size_mib: int, batches: list[int], calls: int = 20) -> list[dict]:
    """One row per (batch, prepack): private memory a session adds, and median call time."""
    import pickle

    import onnx

    rows = []
    with tempfile.TemporaryDirectory() as files, tempfile.TemporaryDirectory(dir="/dev/shm") as segments:
        path = Path(files) / "mlp.onnx"
        onnx.save(onnx_mlp(size_mib), path)
        for prepack in (False, True):
            shared = SharedModel.from_onnx(path, key=f"prepack-{prepack}", directory=segments, prepack=prepack)
            holder = shared.acquire()
            for batch in batches:
                out = subprocess.run([sys.executable, "-c", _PROBE], input=pickle.dumps((shared, batch, calls)),
                                     capture_output=True, check=True, cwd=ROOT)
                rows.append(dict(json.loads(out.stdout), batch=batch, prepack=prepack))
            shared.release(holder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 32, 256])
    args = parser.parse_args()
    rows = measure(args.size_mib, args.batches)
    print(f"ONNX MLP of {args.size_mib} MiB (2048-wide MatMul layers), one fresh process per row\n")
    print("| batch | prepack off: call | prepack on: call | off / on | private MiB per process, off | on |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        off, on = (next(r for r in rows if r["batch"] == batch and r["prepack"] is p) for p in (False, True))
        print(f"| {batch} | {off['call_ms']:.2f} ms | {on['call_ms']:.2f} ms | {off['call_ms'] / on['call_ms']:.2f}x "
              f"| {off['private_mib']:.0f} | {on['private_mib']:.0f} |")


if __name__ == "__main__":
    main()
