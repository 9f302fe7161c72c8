"""Machine-wide figures: the Prometheus collector and ``modelshare top`` read the same counts of
loads, attaches and evictions, and the directory's segments and holders -- from real processes."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelshare import Budget, ModelRouter, SharedModel
from modelshare._host.directory import COUNTS_FILE
from modelshare.metrics import ModelShareCollector, figures

from .router.test_router import _clear
from .support import ROOT
from .support import workers as _workers

prometheus_client = pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")


def _scrape(directory: Path) -> dict[str, float]:
    """What Prometheus reads from a registry with the collector: ``{'name{labels}': value}``."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(ModelShareCollector(directory))
    values = {}
    for line in prometheus_client.generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _hold_in_a_child(shared: SharedModel, ready, done) -> None:
    with shared.use():
        ready.set()
        done.wait(60)


def test_loads_attaches_and_holders_add_up_across_processes(shm_dir: Path, spawn) -> None:
    shared = SharedModel(functools.partial(_workers.make_mlp, 4, 256), key="ranker")
    model = shared.acquire()
    ready, done = spawn.Event(), spawn.Event()
    children = [spawn.Process(target=_hold_in_a_child, args=(shared, ready, done)) for _ in range(2)]
    for child in children:
        child.start()
        assert ready.wait(120)
        ready.clear()
    (segment,) = shm_dir.glob("*.seg")
    scraped = _scrape(shm_dir)
    assert scraped['modelshare_loads_total{key="ranker"}'] == 1
    assert scraped['modelshare_attaches_total{key="ranker"}'] == 2
    assert scraped['modelshare_segment_holders{key="ranker"}'] == 3
    assert scraped[f'modelshare_segment_bytes{{key="ranker",version="{shared.version_hash}"}}'] == \
        segment.stat().st_size
    assert scraped["modelshare_orphaned_segments"] == 0
    done.set()
    for child in children:
        child.join(60)
    shared.release(model)
    del model
    after = _scrape(shm_dir)
    assert after['modelshare_attaches_total{key="ranker"}'] == 2, "counts outlive the segments"
    assert not any(name.startswith("modelshare_segment_bytes{") for name in after)
    top = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), "top", "--once"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    row = next(line.split() for line in top.stdout.splitlines() if line.startswith("ranker "))
    assert row == ["ranker", "1", "2", "0"], "top prints the collector's numbers: loads, attaches, evictions"


def test_evictions_and_the_budget_are_counted(shm_dir: Path) -> None:
    models = {k: SharedModel(functools.partial(_workers.blob, 4, i), key=k) for i, k in enumerate("ab")}
    router = ModelRouter(models, budget=Budget(host="7MiB"), sizes={"a": "4MiB", "b": "4MiB"}, wait=0)
    for key in "aba":
        with router.use(key):
            pass
    scraped = _scrape(shm_dir)
    assert scraped['modelshare_evictions_total{key="a"}'] == 1 and scraped['modelshare_evictions_total{key="b"}'] == 1
    assert scraped['modelshare_loads_total{key="a"}'] == 2
    assert scraped['modelshare_budget_bytes{memory="host"}'] == 7 << 20
    assert figures(shm_dir).budgets == {"host": 7 << 20}
    _clear(router, "ab")


def test_a_planted_or_torn_counts_file_never_fails_an_acquire(shm_dir: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    shm_dir.mkdir(mode=0o700)
    target = tmp_path / "not-ours"
    target.write_text("keep me")
    (shm_dir / COUNTS_FILE).symlink_to(target)
    shared = SharedModel(functools.partial(_workers.make_mlp, 4, 256), key="m")
    with caplog.at_level(logging.WARNING, logger="modelshare"):
        with shared.use():
            pass
    assert target.read_text() == "keep me", "a symlink is never followed"
    assert "cannot count" in caplog.text and figures(shm_dir).counts == {}
    (shm_dir / COUNTS_FILE).unlink()
    (shm_dir / COUNTS_FILE).write_bytes(b'{"keys": {"m": {"loa')  # a write cut short by SIGKILL
    os.chmod(shm_dir / COUNTS_FILE, 0o600)
    with shared.use():
        pass
    assert figures(shm_dir).count("m", "loads") == 1, "unreadable counts start again from zero"


def test_the_collector_without_prometheus_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r'pip install "modelshare\[metrics\]"'):
        ModelShareCollector()
