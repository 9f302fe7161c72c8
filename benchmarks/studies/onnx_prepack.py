"""ONNX Runtime's prepacking, measured: per-call time and private memory for each ``prepack=``
choice, beside a private session (ORT's own, on the file, prepacking on as ORT defaults).

ORT's CPU MatMul repacks a constant weight into its kernel layout. With prepacking on (ORT's
default) that happens once, at session creation, into private memory: fast calls, a private copy
per process. Off (``prepack=False``, modelshare's default) the kernel packs the weight on every
call: no private copy, but each call pays for the packing, most at small batches.
``prepack="shared"`` puts the layouts ORT packed once into the segment: packed calls over shared
memory. Each row runs in a fresh process; ``--rounds`` repeats every row, interleaved. Two more
rows are the mapped file's ground: ORT's own session over the weights as external data with
prepacking off (the ``mmap-file`` peer), and modelshare leaving the weights in that file
(``Processes(map_files=True)``): both compute with the unpacked kernels on the file's pages.

Run: ``python -m benchmarks.studies.onnx_prepack [--size-mib 128]``. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
shared, path, batches, calls, peer = pickle.loads(sys.stdin.buffer.read())
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) / 1024
import onnxruntime as ort
before = anon()
if shared is None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if peer:  # ORT's own mapping of external data: prepacking off
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
else:
    session = shared.acquire()
result = {}
for batch in batches:
    x = onnx_input(batch=batch)
    session.run(None, {'x': x})
    times = []
    for _ in range(calls):
        t = time.perf_counter(); session.run(None, {'x': x}); times.append(time.perf_counter() - t)
    result[batch] = 1e3 * statistics.median(times)
print(json.dumps({'private_mib': anon() - before, 'call_ms': result}))
"""

CHOICES = ("private", False, True, "shared", "mapped-peer", "mapped")


def measure(size_mib: int, batches: list[int], calls: int = 20, rounds: int = 2) -> dict:
    """Per choice: private memory a session adds (MiB, the median) and median call time per batch."""
    import pickle

    import onnx

    from modelshare import Processes

    runs: dict = {choice: [] for choice in CHOICES}
    with tempfile.TemporaryDirectory() as files, tempfile.TemporaryDirectory(dir="/dev/shm") as segments:
        path, external = Path(files) / "mlp.onnx", Path(files) / "external.onnx"
        model = onnx_mlp(size_mib)
        onnx.save(model, path)
        onnx.save(model, external, save_as_external_data=True, location="external.data", size_threshold=1024)
        options = {"intra_op_num_threads": 1}
        shared = {choice: SharedModel.from_onnx(path, key=f"prepack-{choice}", directory=segments, prepack=choice,
                                                session_options=options)
                  for choice in (False, True, "shared")}
        shared["mapped"] = SharedModel.from_onnx(external, key="mapped", directory=segments, session_options=options,
                                                 share=Processes(map_files=True))
        holders = {choice: model.acquire() for choice, model in shared.items()}
        for _ in range(rounds):
            for choice in CHOICES:
                probe = (shared.get(choice), str(external if choice == "mapped-peer" else path), batches, calls,
                         choice == "mapped-peer")
                out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, check=True, cwd=ROOT,
                                     input=pickle.dumps(probe))
                runs[choice].append(json.loads(out.stdout.decode().strip().splitlines()[-1]))
        for choice, holder in holders.items():
            shared[choice].release(holder)
    return {choice: {"private_mib": statistics.median(r["private_mib"] for r in found),
                     "call_ms": {b: statistics.median(r["call_ms"][str(b)] for r in found) for b in batches}}
            for choice, found in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 32, 256])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    found = measure(args.size_mib, args.batches, rounds=args.rounds)
    print(f"ONNX MLP of {args.size_mib} MiB (2048-wide MatMul layers, one intra-op thread), a fresh process per "
          f"row, medians of {args.rounds} rounds\n")
    names = {"private": "private session", False: "prepack=False", True: "prepack=True", "shared": 'prepack="shared"',
             "mapped-peer": "ORT over external data, prepacking off (the mmap-file peer)",
             "mapped": "modelshare, weights left in that file (`map_files=True`)"}
    print("| | private MiB per process | " + " | ".join(f"batch {b}: call (x private)" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    private = found["private"]["call_ms"]
    for choice in CHOICES:
        row = found[choice]
        cells = [f"{row['call_ms'][b]:.2f} ms ({row['call_ms'][b] / private[b]:.2f}x)" for b in args.batches]
        print(f"| {names[choice]} | {row['private_mib']:.0f} | " + " | ".join(cells) + " |")
    peer = found["mapped-peer"]["call_ms"]
    print("\nmodelshare over the mapped file, x the peer: " + ", ".join(
        f"batch {b} {found['mapped']['call_ms'][b] / peer[b]:.3f}x" for b in args.batches))


if __name__ == "__main__":
    main()
