"""``python -m benchmarks``: run a benchmark, print a Markdown table, write JSON to ``--out``.

Benchmarks:
  attach   N fresh processes get one generated model (numpy, torch, onnx or sklearn) privately
           (the framework's own load from a file) or through modelshare (attach to one shared
           segment): time to first inference, per-call latency, total PSS. The default,
           laptop-sized run: a 256 MiB numpy model, 4 processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import attach


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="attach", choices=["attach"])
    parser.add_argument("--framework", default="numpy", choices=sorted(attach.FRAMEWORKS),
                        help="which framework's generated model (default %(default)s)")
    parser.add_argument("--size-mib", type=int, default=256, help="model size (default %(default)s)")
    parser.add_argument("--processes", type=int, default=4, help="worker processes (default %(default)s)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per process (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="results folder (default %(default)s)")
    args = parser.parse_args(argv)

    print(f"[benchmarks] {args.benchmark}: {args.size_mib} MiB {args.framework} model, {args.processes} processes ...",
          file=sys.stderr, flush=True)
    results = attach.run(args.size_mib, args.processes, args.calls, args.framework)
    table = attach.as_markdown(results, args.size_mib)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {"benchmark": args.benchmark, "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
              "results": attach.to_json(results)}
    (args.out / f"{args.benchmark}-{args.framework}-{stamp}.json").write_text(json.dumps(record, indent=2))
    (args.out / f"{args.benchmark}-{args.framework}-{stamp}.md").write_text(table + "\n")
    return 0 if all(r.outputs_equal for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
