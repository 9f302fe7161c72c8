"""The path real runners take: the pipeline through Beam's ``PortableRunner`` and Fn API, each
SDK harness a separate process started by ``python -m apache_beam.runners.worker.worker_pool_main``
(an ``EXTERNAL`` environment), as Dataflow, Flink and Spark run Python transforms.

The DirectRunner's ``multi_processing`` mode only imitates that; this is how to check a
deployment on one machine before it goes to a cluster. Facts of Beam 2.77 this module works with:

* the Python job service (``LocalJobServicer``) runs every job with one harness whatever
  ``--sdk_worker_parallelism`` says (only the Java job servers read it): :func:`job_service`
  gives it a job type whose runner has ``workers`` harnesses;
* the worker pool starts each harness with the first ``python`` on ``PATH``: :func:`worker_pool`
  puts this interpreter's directory first, else the job would hang silently on a harness that
  cannot import the pipeline's code;
* ``--environment_type=PROCESS`` is not supported by the Python runner.

Run: ``python -m benchmarks.studies.portable_runner [--size-mib 256] [--workers 4] [--examples 2000]``
-- Beam's default, ``large_model=True`` and ``SharedModelHandler``, peak PSS of the harnesses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .. import ROOT
from .beam_pipeline import run_measured, save_model

CONFIGS = ["beam-default", "beam-large-model", "modelshare-auto-threads"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def worker_pool(port: int = 0) -> Iterator[tuple[str, subprocess.Popen]]:
    """A Beam worker pool serving ``EXTERNAL`` environments: its address and process (the
    harnesses it starts are its children)."""
    port = port or free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
                break
            if pool.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker pool did not start (exit code {pool.poll()})")
            time.sleep(0.1)
        yield f"localhost:{port}", pool
    finally:
        _wait_for_harnesses(pool.pid, 60)  # they exit (releasing their models) once their job is done
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pool.pid, 9)  # the pool, and any harness that did not
        pool.wait()


def _wait_for_harnesses(pool_pid: int, timeout: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    with contextlib.suppress(psutil.NoSuchProcess):
        while psutil.Process(pool_pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def job_service(workers: int) -> Iterator[str]:
    """Beam's Python job service in this process, running each job with ``workers`` harnesses."""
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class Job(local_job_service.BeamJob):
        def _invoke_runner(self):  # type: ignore[no-untyped-def]
            self.set_state(local_job_service.beam_job_api_pb2.JobState.RUNNING)
            runner = fn_runner.FnApiRunner(provision_info=self._provision_info)
            runner._num_workers = workers  # what direct_num_workers sets, which this path never reads
            return runner.run_via_runner_api(self._pipeline_proto, self.pipeline_options())

    service = local_job_service.LocalJobServicer(beam_job_type=Job)
    port = service.start_grpc_server(0)
    try:
        yield f"localhost:{port}"
    finally:
        service.stop()


def portable_options(job_endpoint: str, pool_address: str) -> list[str]:
    """The pipeline options of a portable run on these services."""
    return ["--runner=PortableRunner", f"--job_endpoint={job_endpoint}", "--environment_type=EXTERNAL",
            f"--environment_config={pool_address}"]


_PIPELINE = """
import json, sys, time
import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from benchmarks.studies.beam_pipeline import handler_for, examples_for
from benchmarks.studies.portable_runner import job_service, portable_options
config, path, size_mib, width, workers, examples, pool = sys.argv[1:8]
handler = handler_for('torch', config, path, int(size_mib), int(width))
data = examples_for('torch', int(width), int(examples))
start = time.perf_counter()
with job_service(int(workers)) as endpoint:
    with beam.Pipeline(options=PipelineOptions(portable_options(endpoint, pool))) as p:
        _ = p | beam.Create(data) | RunInference(handler) | beam.Map(lambda r: r.inference is not None)
print(json.dumps({'wall_s': time.perf_counter() - start}))
"""


def run_config(config: str, path: Path, size_mib: int, width: int, workers: int, examples: int) -> dict:
    """One configuration through a fresh worker pool; wall time and the harnesses' peak total PSS."""
    with worker_pool() as (address, pool):
        return run_measured(_PIPELINE, [config, str(path), str(size_mib), str(width), str(workers), str(examples),
                                        address], config, measured=pool.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = save_model("torch", args.size_mib, args.width, Path(folder))
        rows = [run_config(c, path, args.size_mib, args.width, args.workers, args.examples) for c in args.configs]
    print(f"PyTorch MLP of {args.size_mib} MiB, {args.examples} examples, PortableRunner (Python job service, "
          f"{args.workers} harnesses from a worker pool, EXTERNAL environment)\n")
    print("| configuration | wall time | peak PSS of the harnesses |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['wall_s']:.1f} s | {row['peak_pss_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
