"""Serving a model per request: gunicorn and uvicorn workers, loads, latency and memory.

The examples' apps (``examples/wsgi_app.py``, ``examples/asgi_app.py``) under real servers, 4
workers, requests from 4 client threads, on a generated MLP:

* ``gunicorn-private``: no modelshare, every worker loads its own copy at import (no
  ``--preload``; its loads are not counted: nothing is shared);
* ``gunicorn-use-linger0``: ``--preload``, ``with shared.use()`` per request, ``linger=0`` (the
  behaviour before the linger: the last release between requests unlinks, the next one reloads);
* ``gunicorn-use``: the same with the default linger (10 s);
* ``gunicorn-held``: ``--preload``, the model acquired at import (the master loads, workers inherit);
* ``uvicorn-held``: 4 spawned workers, each acquiring in its lifespan startup.

Per setup: loads and attaches (the app's ``/metrics``), request latency p50/p95 (first requests
included: a load is part of what a request waits for), and the PSS of the server's processes
right after the requests.

Run: ``python -m benchmarks.studies.request_serving [--size-mib 256] [--requests 80]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from modelshare import memory

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = [sys.executable, "-m", "gunicorn", "--workers", "4", "examples.wsgi_app:app"]
UVICORN = [sys.executable, "-m", "uvicorn", "--workers", "4", "--log-level", "warning", "examples.asgi_app:app"]
SETUPS: dict[str, tuple[list[str], dict[str, str]]] = {
    "gunicorn-private": (GUNICORN, {"EXAMPLE_PRIVATE": "1"}),
    "gunicorn-use-linger0": ([*GUNICORN, "--preload"], {"MODELSHARE_LINGER": "0"}),
    "gunicorn-use": ([*GUNICORN, "--preload"], {}),
    "gunicorn-held": ([*GUNICORN, "--preload"], {"EXAMPLE_HOLD": "1"}),
    "uvicorn-held": (UVICORN, {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> bytes:
    """The body of a GET of ``url``."""
    with urllib.request.urlopen(url, timeout=120) as response:
        return bytes(response.read())


class Server:
    """A running server of the examples' app: its base URL and process."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process, self.url = process, url

    def requests(self, seeds: range) -> list[tuple[dict[str, Any], float]]:
        """``/predict`` for each seed from 4 client threads: each answer and its latency (s)."""
        def one(seed: int) -> tuple[dict[str, Any], float]:
            start = time.perf_counter()
            answer = json.loads(get(f"{self.url}/predict?seed={seed}"))
            return answer, time.perf_counter() - start

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, seeds))

    def counts(self) -> dict[str, float]:
        """Loads and attaches of the example's model, as the app's ``/metrics`` says."""
        text = get(f"{self.url}/metrics").decode()
        found = {}
        for event in ("loads", "attaches"):
            name = f'modelshare_{event}_total{{key="example-mlp"}}'
            found[event] = next((float(line.rpartition(" ")[2]) for line in text.splitlines()
                                 if line.startswith(name)), 0.0)
        return found


@contextlib.contextmanager
def serve(command: list[str], env: dict[str, str]) -> Iterator[Server]:
    """Start ``command`` (gunicorn or uvicorn) on a free port from the repository root; stop it after."""
    port = _free_port()
    where = ["--port", str(port)] if "uvicorn" in command else ["--bind", f"127.0.0.1:{port}"]
    process = subprocess.Popen([*command, *where], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                get(f"{url}/metrics")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(command)} did not start: {process.stdout.read()}") from None
                time.sleep(0.2)
        yield Server(process, url)
    finally:
        process.terminate()
        process.wait(60)


def run_setup(setup: str, size_mib: int, requests: int, directory: Path) -> dict[str, Any]:
    """One setup: loads, attaches, latency percentiles (ms) and the server's PSS (MiB)."""
    command, env = SETUPS[setup]
    with serve(command, dict(env, MODELSHARE_DIR=str(directory), EXAMPLE_MODEL_MIB=str(size_mib))) as server:
        answers = server.requests(range(requests))
        pss = memory.total_pss([server.process.pid], descendants=True)
        counts = server.counts()
    latencies = sorted(seconds * 1000 for _, seconds in answers)
    return {"setup": setup, "loads": counts["loads"], "attaches": counts["attaches"],
            "p50_ms": statistics.median(latencies), "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
            "pss_mib": pss / 2**20, "workers": len({a["pid"] for a, _ in answers})}


def main(argv: Optional[list[str]] = None, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--setups", nargs="*", default=list(SETUPS))
    args = parser.parse_args(argv)
    rows = []
    for setup in args.setups:
        with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
            rows.append(run_setup(setup, args.size_mib, args.requests, Path(folder) / "modelshare"))
    report(f"{args.size_mib} MiB numpy MLP, 4 workers, {args.requests} requests from 4 threads\n")
    report("| setup | loads | attaches | p50 ms | p95 ms | server PSS MiB |")
    report("|---|---|---|---|---|---|")
    for row in rows:
        private = row["setup"] == "gunicorn-private"
        report(f"| {row['setup']} | {'-' if private else int(row['loads'])} "
               f"| {'-' if private else int(row['attaches'])} | {row['p50_ms']:.1f} | {row['p95_ms']:.1f} "
               f"| {row['pss_mib']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
