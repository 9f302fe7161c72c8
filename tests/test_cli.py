"""`modelshare ls | gc` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from modelshare import SharedModel, list_segments


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelshare", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=60)


def test_ls_shows_key_size_holders_and_age(shm_dir: Path) -> None:
    shared = SharedModel(lambda: {"w": np.ones(1 << 20)}, key="listed", version="v3")
    with shared.use():
        out = _cli("ls")
        assert out.returncode == 0, out.stderr
        header, row, total = out.stdout.splitlines()
        assert header.split() == ["KEY", "VERSION", "CODEC", "SIZE", "HOLDERS", "AGE", "STATE"]
        assert row.split()[:5] == ["listed", "v3", "generic", "8.0", "MiB"]
        assert str(os.getpid()) in row and "ready" in row
        assert total.startswith("1 segment(s), 8.0 MiB")
        as_json = json.loads(_cli("ls", "--json").stdout)
        assert as_json[0]["key"] == "listed" and as_json[0]["holders"] == [os.getpid()]
    assert "no segments" in _cli("ls").stdout


def test_gc_keeps_held_and_warm_segments(shm_dir: Path) -> None:
    held = SharedModel(lambda: {"w": np.ones(4096)}, key="held")
    warm = SharedModel(lambda: {"w": np.ones(4096)}, key="warm", keep_warm=True)
    with warm.use():
        pass
    with held.use():
        out = _cli("gc", "--dry-run")
        assert "would remove 0 file(s)" in out.stdout
        assert {i.key for i in list_segments(shm_dir)} == {"held", "warm"}
        out = _cli("gc", "--all")
        assert "removed 1 file(s)" in out.stdout and "warm--" in out.stdout
        assert [i.key for i in list_segments(shm_dir)] == ["held"]


def test_console_script_and_dir_flag(shm_dir: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "modelshare"
    if not script.exists():
        import pytest

        pytest.skip("the modelshare console script is not installed in this environment")
    out = subprocess.run([str(script), "--dir", str(tmp_path), "ls"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"no segments in {tmp_path}" in out.stdout
