"""The OOM benchmark suite: each approach of a scenario, run under a real memory limit.

For every (approach, number of processes) the suite starts that many worker processes
(``benchmarks.suite.worker``) inside a fresh memory cgroup whose limit the private approach cannot
fit, samples what the run has in use (the cgroup's anonymous and shared memory: what cannot be
reclaimed) and the workers' total PSS every 200 ms, and records who survived: an OOM kill is a
result (``oom-killed``), not a crash of the suite. Where no cgroup can be made (not root, no
delegated subtree) the limit is not enforced: the suite says so, and a run whose measured peak
exceeds the limit is reported ``over-limit``.

Before the runs the suite generates the model, computes its reference output with a private
load (every completed run's outputs are compared to it) and measures what a bare worker process
costs, from which the scenario's default limit follows.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import psutil

from modelshare import memory
from modelshare.memory import total_pss

from .. import ROOT
from ..cgroup import CgroupUnavailable, MemoryCgroup
from ..frameworks import FRAMEWORKS
from ..models import MiB
from .approaches import RunSpec
from .scenarios import Scenario
from .worker import RELEASE

SAMPLE_EVERY_S = 0.2
SCRATCH_PREFIX = "modelshare-bench-"  # + the suite's pid: cgroups, scratch and segment folders


@dataclass
class RunResult:
    """What one approach did with N processes under the limit."""

    scenario: int
    approach: str
    framework: str
    model_mib: float
    processes: int
    threads: int
    limit_mib: float
    limit_enforced: bool
    status: str  # completed | oom-killed | failed | over-limit | timed-out
    bare_mib: float = 0.0  # what one idle worker process costs (the floor per process)
    oom_kills: int = 0
    peak_in_use_mib: float = 0.0  # sampled anonymous + shared memory (without a cgroup: total PSS)
    peak_charged_mib: float = 0.0  # the cgroup's own peak, page cache included (without one: total PSS)
    peak_pss_mib: float = 0.0
    held_pss_mib: Optional[float] = None  # once every worker is done and holds the model: no faulting under way
    peak_gpu_used_mib: Optional[float] = None  # all GPUs' used memory (NVML), where there are GPUs
    first_inference_s: Optional[float] = None  # median over the worker threads
    calls_per_s: Optional[float] = None  # all threads together
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99
    outputs_equal: Optional[bool] = None
    wall_s: float = 0.0
    error: str = ""
    stats: dict[str, int] = field(default_factory=dict)  # approach counters (keyed: loads, hits, evictions)
    timeline: list[tuple[float, float, float]] = field(default_factory=list)  # (s, in use MiB, PSS MiB)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreparedModel:
    """The generated model on disk, its size and the reference output of a private load."""

    framework: str
    path: Path
    nbytes: int
    reference: Any


def prepare_model(framework_name: str, size_mib: int, folder: Path) -> PreparedModel:
    """Generate a ``size_mib`` model, save it in its framework's format, and compute its reference output."""
    framework = FRAMEWORKS[framework_name]
    path = folder / f"model-{framework_name}-{size_mib}mib"
    framework.save(framework.build(size_mib), path)
    model = framework.load(path)
    reference = np.asarray(framework.call(model, framework.sample()))
    del model
    return PreparedModel(framework_name, path, sum(f.stat().st_size for f in framework.files(path)), reference)


def compile_bytecode() -> None:
    """Compile the worker code of this checkout (modelshare and the suite) to bytecode, as ``pip
    install`` does for an installed package and for every peer's: an editable install under
    ``PYTHONDONTWRITEBYTECODE`` compiles modelshare from source in every worker otherwise, which
    measured 40-60 ms and 1.2 MiB a process -- a cost of this checkout, not of modelshare."""
    import compileall

    for package in ("modelshare", "benchmarks"):
        compileall.compile_dir(ROOT / package, quiet=2)


def _drop_page_cache(paths: list[Path]) -> None:
    """Evict the model's files from the page cache, so that every run reads them (and is charged for them) anew."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bare_worker_bytes(framework_name: str, use_cgroup: bool) -> int:
    """What one idle worker process costs: the interpreter, the framework, modelshare and Beam's
    sharing modules imported. Two are measured together so that shared pages count once."""
    module = FRAMEWORKS[framework_name].module
    code = (f"import {module}, modelshare, apache_beam.utils.shared, apache_beam.utils.multi_process_shared, "
            "sys, time; print('ready', flush=True); time.sleep(1.5)")
    command = [sys.executable, "-c", code]
    cgroup = _try_cgroup(f"bare-{framework_name}", 16 << 30) if use_cgroup else None
    procs = [subprocess.Popen(cgroup.wrap(command) if cgroup else command, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, cwd=ROOT) for _ in range(2)]
    try:
        for proc in procs:
            proc.stdout.readline()
        if cgroup is not None:
            return cgroup.peak() // 2
        return total_pss((p.pid for p in procs), descendants=True) // 2
    finally:
        for proc in procs:
            proc.wait()
            proc.stdout.close()
        if cgroup is not None:
            cgroup.remove()


def _try_cgroup(label: str, limit: int) -> Optional[MemoryCgroup]:
    try:
        return MemoryCgroup.create(f"{SCRATCH_PREFIX}{os.getpid()}-{label}", limit)
    except CgroupUnavailable:
        return None


def sweep_leftovers() -> None:
    """Remove what a killed suite left: its cgroups (and their processes), scratch and segment folders."""
    def orphaned(name: str) -> bool:
        pid = name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        return pid.isdigit() and not psutil.pid_exists(int(pid))

    for cgroup in MemoryCgroup.existing(SCRATCH_PREFIX):
        if orphaned(cgroup.path.name):
            cgroup.remove()
    for root in (Path(tempfile.gettempdir()), Path("/dev/shm")):
        for folder in root.glob(SCRATCH_PREFIX + "*"):
            if orphaned(folder.name):
                shutil.rmtree(folder, ignore_errors=True)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_one(scenario: Scenario, approach: str, model: PreparedModel, processes: int, threads: int, calls: int,
            limit: int, use_cgroup: bool, progress: Callable[[str], None] = lambda _: None,
            timeout: float = 900.0, bare: int = 0) -> RunResult:
    """Run ``approach`` with ``processes`` workers under ``limit`` bytes; never raises for what the run did."""
    result = RunResult(scenario.number, approach, model.framework, model.nbytes / MiB, processes, threads,
                       limit / MiB, False, "failed", bare_mib=bare / MiB)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    segment_dir = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir="/dev/shm"))
    cgroup = _try_cgroup(f"{approach}-{processes}", limit) if use_cgroup else None
    result.limit_enforced = cgroup is not None
    _drop_page_cache(FRAMEWORKS[model.framework].files(model.path))
    for i in range(scenario.keyed_models if scenario.keyed_models > 1 else 0):  # keyed models: one file each
        keyed = Path(f"{model.path}.k{i}")
        if not keyed.exists():
            os.link(model.path, keyed)
    budget = scenario.held_models * (model.nbytes + (1 << 20))  # the router's: N models and their headers
    spec = RunSpec(model.framework, str(model.path), approach, threads, calls, f"bench-{approach}",
                   str(run_dir), str(segment_dir), time.time(), scenario.copies, scenario.keyed_models,
                   scenario.held_models, budget, processes)
    (run_dir / "spec.json").write_text(json.dumps(asdict(spec)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.monotonic()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(processes):
            command = [sys.executable, "-m", "benchmarks.suite.worker", str(run_dir / "spec.json"), str(index)]
            with open(run_dir / f"worker-{index}.err", "wb") as err:
                workers.append(subprocess.Popen(cgroup.wrap(command) if cgroup else command, cwd=ROOT, env=env,
                                                stdout=subprocess.DEVNULL, stderr=err))
        _watch(result, workers, run_dir, cgroup, started, progress, timeout)
    finally:
        (run_dir / RELEASE).touch()
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        shutil.rmtree(segment_dir, ignore_errors=True)  # before the cgroup goes: its tmpfs pages are charged there
        if cgroup is not None:
            result.peak_charged_mib = cgroup.peak() / MiB
            result.oom_kills = cgroup.oom_kills()
            cgroup.remove()
        _collect(result, model, run_dir, processes)
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _watch(result: RunResult, workers: list[subprocess.Popen[bytes]], run_dir: Path,
           cgroup: Optional[MemoryCgroup], started: float, progress: Callable[[str], None], timeout: float) -> None:
    """Sample memory until every worker has either written its results or exited."""
    def pss_now() -> int:
        return total_pss([w.pid for w in workers] + (cgroup.pids() if cgroup else []), descendants=True)

    while True:
        pss = pss_now()
        in_use = cgroup.in_use() if cgroup else pss
        elapsed = time.monotonic() - started
        result.timeline.append((round(elapsed, 2), round(in_use / MiB, 1), round(pss / MiB, 1)))
        result.peak_pss_mib = max(result.peak_pss_mib, pss / MiB)
        result.peak_in_use_mib = max(result.peak_in_use_mib, in_use / MiB)
        gpu_used = sum(g.used for g in gpus) if (gpus := memory.gpus()) else None
        if gpu_used is not None:
            result.peak_gpu_used_mib = max(result.peak_gpu_used_mib or 0.0, gpu_used / MiB)
        if cgroup is None:
            result.peak_charged_mib = result.peak_pss_mib
        progress(f"{elapsed:5.1f} s, {in_use / MiB:6.0f} MiB in use")
        settled = [(run_dir / f"worker-{i}.json").exists() or w.poll() is not None for i, w in enumerate(workers)]
        if all(settled):
            # The peak may count a page twice: processes are read one after the other while pages are
            # faulted in (one read before another maps the page). Held, nothing is being faulted.
            result.held_pss_mib = pss_now() / MiB
            break
        if elapsed > timeout:
            result.status, result.error = "timed-out", f"still running after {timeout:.0f} s"
            break
        time.sleep(SAMPLE_EVERY_S)
    result.wall_s = time.monotonic() - started


def _collect(result: RunResult, model: PreparedModel, run_dir: Path, processes: int) -> None:
    """Read the workers' results and decide the run's status."""
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("worker-*.json"))]
    if result.status == "timed-out":
        return
    if result.oom_kills:
        result.status = "oom-killed"
        return
    if len(records) < processes:
        errors = [p.read_text(errors="replace").strip() for p in sorted(run_dir.glob("worker-*.err"))]
        result.error = next((e.splitlines()[-1] for e in errors if e), "a worker exited without results")[-500:]
        result.status = "failed"
        return
    for record in records:  # counters: per worker ones add up, machine-wide ones (machine_*) are read once
        for name, value in record.get("stats", {}).items():
            if name.startswith("machine_"):
                result.stats[name[8:]] = max(result.stats.get(name[8:], 0), value)
            else:
                result.stats[name] = result.stats.get(name, 0) + value
    threads = [t for record in records for t in record["threads"]]
    latencies = [ms for t in threads for ms in t["latencies_ms"]]
    span = max(t["calls_end"] for t in threads) - min(t["calls_start"] for t in threads)
    result.first_inference_s = statistics.median(t["first_inference_s"] for t in threads)
    result.calls_per_s = len(latencies) / span if span > 0 else None
    result.latency_ms = {f"p{q}": _percentile(latencies, q) for q in (50, 90, 99)}
    framework = FRAMEWORKS[model.framework]
    result.outputs_equal = all(framework.equal(np.load(p), model.reference) for p in run_dir.glob("output-*.npy"))
    over = not result.limit_enforced and result.peak_in_use_mib > result.limit_mib
    result.status = "over-limit" if over else "completed"
