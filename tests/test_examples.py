"""The examples, run as users run them: gunicorn --preload, uvicorn workers, DataLoader workers, a
Pool terminated and started again -- each gives right answers, loads the model once, and pays
for its weights once (every worker's share of the segment adds up to one copy, and no worker
holds a private copy)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.models import numpy_mlp
from benchmarks.studies.request_serving import GUNICORN, UVICORN, serve
from examples.serving import WIDTH, request_input
from modelshare import memory

from .support import ROOT, left_after
from .support.workers import MiB

MODEL_MIB = 64


def _env(shm_dir: Path, **extra: str) -> dict[str, str]:
    """What the examples read from the environment, on top of the test's own."""
    return dict(MODELSHARE_DIR=str(shm_dir), EXAMPLE_MODEL_MIB=str(MODEL_MIB), MODELSHARE_LINGER="10", **extra)


@functools.lru_cache(maxsize=1)
def _private_model() -> Any:
    """The examples' model, loaded privately here: what every answer must equal."""
    return numpy_mlp(MODEL_MIB, WIDTH)


def _expected(seed: int) -> float:
    return float(_private_model()(request_input(seed)).sum())


def _serve_and_check(command: list[str], env: dict[str, str], shm_dir: Path) -> dict[str, float]:
    """Start the server, send 40 requests from 4 threads, check every answer and the memory; the
    loads and attaches its /metrics reports."""
    with serve(command, env) as server:
        answers = [answer for answer, _ in server.requests(range(40))]
        for seed, answer in enumerate(answers):
            assert answer["output"] == pytest.approx(_expected(seed), rel=1e-6)
        (segment,) = shm_dir.glob("*.seg")
        shares = [memory.process(pid, shm_dir) for pid in {a["pid"] for a in answers}]
        assert sum(s.segment_pss for s in shares) <= 1.01 * segment.stat().st_size, "the weights counted once"
        for share in shares:
            assert share.private < MODEL_MIB * MiB / 2, f"worker {share.pid} holds {share.private / MiB:.0f} MiB " \
                                                          "of its own: a private copy"
        figures = server.counts()
    assert left_after(shm_dir) == [], "the workers shut down cleanly: their last release unlinked the segment"
    return figures


@pytest.mark.parametrize("hold", ["0", "1"], ids=["use-per-request", "held-from-import"])
def test_gunicorn_preload_workers_share_one_load(hold: str, shm_dir: Path) -> None:
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    figures = _serve_and_check([*GUNICORN, "--preload"], _env(shm_dir, EXAMPLE_HOLD=hold), shm_dir)
    assert figures["loads"] == 1
    if hold == "1":
        assert figures["attaches"] == 0, "the master loaded it at import: forked workers inherit it"


def test_uvicorn_workers_share_one_load(shm_dir: Path) -> None:
    pytest.importorskip("uvicorn", reason="uvicorn is not installed")
    figures = _serve_and_check(UVICORN, _env(shm_dir), shm_dir)
    assert figures == {"loads": 1, "attaches": 3}, "each worker holds it from its startup: one load, three attaches"


def _run_example(script: str, shm_dir: Path, *args: str) -> dict:
    run = subprocess.run([sys.executable, f"examples/{script}", *args], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), **_env(shm_dir)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_dataloader_workers_share_one_load(start: str, shm_dir: Path) -> None:
    pytest.importorskip("torch", reason="the torch extra is not installed")
    result = _run_example("dataloader_workers.py", shm_dir, start)
    assert result["right"] and len(result["workers"]) == 4
    assert (result["loads"], result["attaches"]) == (1, 3)


def test_a_terminated_pool_leaves_an_orphan_the_next_pool_adopts(shm_dir: Path) -> None:
    result = _run_example("pool_restart.py", shm_dir)
    assert result["right"] == [True, True]
    assert result["between"] == ["orphaned"], "terminated mid-task, the workers left the segment whole"
    assert result["loads"] == 1, "the second pool adopted it: not loaded again"
