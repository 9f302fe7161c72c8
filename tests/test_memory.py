"""The memory figures the suite asserts on: USS/PSS, segment bytes, anonymous memory, peaks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from modelshare import SharedModel, memory


def test_memory_figures_count_a_segment_once(shm_dir: Path) -> None:
    shared = SharedModel(lambda: {"w": np.ones((8 << 20) // 8)}, key="mem")
    with shared.use() as model:
        model["w"].sum()  # touch every page
        mine = memory.process()
        size = model["w"].nbytes
        assert mine.segment_pss >= size * 0.99, "this process maps and touches the whole segment"
        assert mine.pss >= mine.segment_pss and mine.rss >= mine.uss
        assert mine.segment_uss >= size * 0.99, "only this process maps it: the segment is in its USS too"
        assert mine.private == mine.uss - mine.segment_uss
        assert memory.segment_bytes(shm_dir) >= size
    del model
    assert memory.segment_bytes(shm_dir) == 0
    host = memory.host()
    assert 0 < host.available <= host.total and host.used == host.total - host.available


@pytest.mark.parametrize("nvml", ["not installed", "installed"])
def test_no_gpu_figures_say_why_once(nvml: str) -> None:
    """Without nvidia-ml-py, or without a driver for it, ``gpus()`` is ``[]`` and a warning says
    which (once per process) -- not silence, which reads as "no GPU"."""
    import importlib.util

    if nvml == "installed" and importlib.util.find_spec("pynvml") is None:
        pytest.skip('nvidia-ml-py is not installed (pip install "modelshare[gpu]")')
    hide = "sys.modules['pynvml'] = None; " if nvml == "not installed" else ""
    code = ("import sys, warnings; " + hide + "from modelshare import memory; warnings.simplefilter('always'); "
            "print(memory.gpus(), memory.gpus())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if not run.stdout.startswith("[] "):  # a GPU machine: figures, no warning
        assert "RuntimeWarning" not in run.stderr
        return
    assert run.stdout.strip() == "[] []"
    assert run.stderr.count("RuntimeWarning: modelshare.memory.gpus(): no GPU figures") == 1, run.stderr
    expected = 'pip install "modelshare[gpu]"' if nvml == "not installed" else "NVML cannot start"
    assert expected in run.stderr


def test_anonymous_memory_and_its_peak_see_a_private_copy() -> None:
    before = memory.anonymous_bytes()
    with memory.Peak(memory.anonymous_bytes, every=0.002) as peak:
        block = np.ones((64 << 20) // 8)  # 64 MiB of private, touched pages
        time.sleep(0.05)
        del block
    assert peak.value - before >= 60 << 20, "the peak saw the 64 MiB that came and went"


def test_total_pss_counts_descendants_only_when_asked() -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', "
                               "'import numpy, time; a = numpy.ones(32 << 17); time.sleep(60)']); "
                               "time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while memory.total_pss([parent.pid], descendants=True) - memory.total_pss([parent.pid]) < 30 << 20:
            assert time.monotonic() < deadline, "the child's 32 MiB never showed up"
            time.sleep(0.1)
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()
    with pytest.raises(psutil.NoSuchProcess):
        memory.total_pss([parent.pid])
    assert memory.total_pss([parent.pid], descendants=True) == 0, "gone processes are skipped when sampling trees"
