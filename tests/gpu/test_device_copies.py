"""GPU copies, the part that runs without a GPU: the keeper that outlives the process which made
a copy, its holds and files, with real processes and real SIGKILLs -- a memfd stands in for the
exported CUDA memory, since the keeper never touches the GPU and holds any descriptor -- and the
clear errors, the layout and the admission checks. ``tests/test_gpu.py`` runs the CUDA half on a
machine with a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modelshare import DeviceUnavailableError, MemoryBudgetExceeded, Processes, SharedModel
from modelshare._gpu.copies import admit, device_layout
from modelshare._gpu.keeper import (
    DeviceCopyFiles,
    list_device_copies,
    read_status,
    request_copy,
    start_keeper,
    sweep_device_copies,
)
from modelshare._host.directory import SegmentName
from modelshare._modes.processes import parse_device

from ..support import leftovers
from ..support import workers as _workers
from ..support.workers import MiB


def _has_gpu() -> bool:
    try:
        from modelshare._gpu.cuda import driver

        return driver("probe").device_count > 0
    except Exception:
        return False


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_holding(name: str) -> list[int]:
    """Pids of this user's processes with a descriptor on the memfd called ``name``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        if any(link.startswith(f"/memfd:{name}") for link in links):
            found.append(int(entry))
    return found


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: tests/gpu/test_gpu.py covers device=")
def test_without_a_gpu_device_raises_a_clear_error_before_loading(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    shared = SharedModel(lambda: _workers.make_mlp(1, 64, counter=counter), key="gpu-model",
                         share=Processes(device="cuda:0"))
    with pytest.raises(DeviceUnavailableError, match="needs an NVIDIA GPU.*leave device= out"):
        shared.acquire()
    assert _workers.loads_counted(counter) == []  # nothing loaded for a GPU that is not there
    assert not shm_dir.exists() or leftovers(shm_dir) == []


def test_device_arguments_are_checked() -> None:
    for bad in ("gpu0", "cuda:x", "cuda:-1", "cpu"):
        with pytest.raises(ValueError, match="'cuda' or 'cuda:N'"):
            Processes(device=bad)
    assert SharedModel(dict, key="m", share=Processes(device="cuda")).mode.device == "cuda:0"
    assert parse_device("cuda:3") == 3
    with pytest.raises(TypeError, match="device"):
        SharedModel(dict, key="m", share="threads", device="cuda:0")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="pass device= too"):
        Processes(gpu_budget="1GiB")
    with pytest.raises(ValueError, match="cannot read the size"):
        Processes(device="cuda:0", gpu_budget="lots")
    assert Processes(device="cuda:0", gpu_budget="1GiB").gpu_budget == 1 << 30


def test_layout_puts_each_torch_storage_once_at_aligned_offsets() -> None:
    torch = pytest.importorskip("torch", reason="the GPU layout is about torch storages")
    from modelshare.codecs import codec_for

    layer = torch.nn.Linear(100, 30)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(30, 100))
    model[2].weight = torch.nn.Parameter(layer.weight.t())  # tied: one storage, two tensors
    model.table = np.arange(5000, dtype=np.float32)  # host data: stays in host memory
    encoded = codec_for(model).encode(model)
    manifest = [{"nbytes": b.nbytes, "info": info} for b, info in zip(encoded.buffers, encoded.buffer_info)]
    layout = device_layout(manifest)
    torch_buffers = [i for i, info in enumerate(encoded.buffer_info) if "torch_storage" in info]
    assert sorted(layout.offsets) == torch_buffers and len(torch_buffers) == 3  # weight (tied), 2 biases
    spans = sorted((offset, offset + manifest[i]["nbytes"]) for i, offset in layout.offsets.items())
    assert all(start % 256 == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert layout.nbytes >= spans[-1][1] and layout.nbytes % 256 == 0


def test_the_keeper_serves_each_holder_and_leaves_with_the_last(shm_dir: Path, spawn) -> None:
    shm_dir.mkdir(mode=0o700)
    files = DeviceCopyFiles(SegmentName(shm_dir, "mlp--0123"), _workers.FAKE_GPU)
    fd = _workers.memfd_with(4 * MiB, b"weights!")
    with files.starting():
        lease = start_keeper(files, fd, nbytes=4 * MiB, fingerprint="f" * 64, read_only=True, key="mlp")
    os.close(fd)  # the keeper has its own descriptor now
    results, check, done = spawn.Queue(), spawn.Event(), spawn.Event()
    holders = [spawn.Process(target=_workers.map_copy_and_check,
                             args=(str(shm_dir), "mlp--0123", b"weights!", results, check, done)) for _ in range(2)]
    for p in holders:
        p.start()
    mapped = [results.get(timeout=60) for _ in holders]
    assert sorted(m[1] for m in mapped) == sorted(p.pid for p in holders) and all(m[2] for m in mapped)

    info = read_status(files)
    assert info is not None and info.alive and info.key == "mlp" and info.nbytes == 4 * MiB
    assert info.creator == os.getpid() and sorted(info.holders) == sorted([os.getpid(), *(p.pid for p in holders)])
    assert [c.key for c in list_device_copies(shm_dir)] == ["mlp"]
    out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), "ls"], capture_output=True,
                         text=True, check=True).stdout
    assert "GPU COPY" in out and "cuda:0" in out and str(holders[0].pid) in out

    lease.close()  # the maker lets go: the others keep the copy
    assert _wait_for(lambda: os.getpid() not in read_status(files).holders)
    done.set()
    for p in holders:
        p.join(30)
    assert _wait_for(lambda: not files.status.exists() and not files.sock.exists() and not files.start.exists())
    assert _wait_for(lambda: not _pid_alive(info.keeper))
    assert _wait_for(lambda: _processes_holding("modelshare-test-copy") == [])  # the memory itself is gone


def test_sigkill_of_the_process_that_made_the_copy_keeps_it_for_the_others(shm_dir: Path, spawn) -> None:
    shm_dir.mkdir(mode=0o700)
    stem = "big--4567"
    files = DeviceCopyFiles(SegmentName(shm_dir, stem), _workers.FAKE_GPU)
    results, check, done, maker_done = spawn.Queue(), spawn.Event(), spawn.Event(), spawn.Event()
    maker = spawn.Process(target=_workers.make_copy_and_hold,
                          args=(str(shm_dir), stem, 8 * MiB, b"tensor", results, maker_done))
    maker.start()
    assert results.get(timeout=60) == ("made", maker.pid)
    first = spawn.Process(target=_workers.map_copy_and_check,
                          args=(str(shm_dir), stem, b"tensor", results, check, done))
    first.start()
    assert results.get(timeout=60)[2]

    os.kill(maker.pid, signal.SIGKILL)
    maker.join(10)
    assert _wait_for(lambda: maker.pid not in read_status(files).holders)
    check.set()
    assert results.get(timeout=30) == ("checked", first.pid, True)  # still computing on the same copy
    late = spawn.Process(target=_workers.map_copy_and_check, args=(str(shm_dir), stem, b"tensor", results, check, done))
    late.start()  # a process that comes after the maker died still gets the copy, not a new one
    assert results.get(timeout=60) == ("mapped", late.pid, True)

    done.set()
    for p in (first, late):
        p.join(30)
    assert _wait_for(lambda: not files.status.exists() and not files.start.exists())
    assert _wait_for(lambda: _processes_holding("modelshare-test-copy") == [])  # the keeper has exited too


def test_a_sigkilled_keeper_leaves_files_that_gc_removes(shm_dir: Path, spawn) -> None:
    shm_dir.mkdir(mode=0o700)
    files = DeviceCopyFiles(SegmentName(shm_dir, "m--89ab"), _workers.FAKE_GPU)
    fd = _workers.memfd_with(MiB, b"w")
    with files.starting():
        lease = start_keeper(files, fd, nbytes=MiB, fingerprint="f" * 64, read_only=True, key="m")
    os.close(fd)
    keeper = read_status(files).keeper
    os.kill(keeper, signal.SIGKILL)
    assert _wait_for(lambda: not _pid_alive(keeper))
    lease.close()
    assert [c.alive for c in list_device_copies(shm_dir)] == [False]
    assert request_copy(files) is None  # nobody hands it out: the next process makes a new copy
    out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), "gc"], capture_output=True,
                         text=True, check=True).stdout
    assert f"{files.status}" in out
    assert list_device_copies(shm_dir) == [] and sweep_device_copies(shm_dir) == []
    assert leftovers(shm_dir) == []


def test_admission_names_the_model_its_size_and_what_holds_the_gpu(shm_dir: Path) -> None:
    shm_dir.mkdir(mode=0o700)
    held = DeviceCopyFiles(SegmentName(shm_dir, "ranker--aaaa"), _workers.FAKE_GPU)
    fd = _workers.memfd_with(MiB, b"w")
    with held.starting():
        lease = start_keeper(held, fd, nbytes=64 * MiB, fingerprint="f" * 64, read_only=True, key="ranker")
    os.close(fd)
    try:
        other = DeviceCopyFiles(SegmentName(shm_dir, "scorer--bbbb"), _workers.FAKE_GPU)
        plenty = (80 << 30, 80 << 30)
        with pytest.raises(MemoryBudgetExceeded) as refused:
            admit("scorer", other, 32 * MiB, plenty, gpu_budget=80 * MiB)
        message = str(refused.value)
        assert "'scorer' needs 32.0 MiB on cuda:0" in message and "budget there is 80.0 MiB" in message
        assert f"ranker 64.0 MiB (pids {os.getpid()})" in message
        admit("scorer", other, 16 * MiB, plenty, gpu_budget=80 * MiB)  # fits with what is held
        another_gpu = DeviceCopyFiles(other.name, "f" * 32, index=1)
        admit("scorer", another_gpu, 32 * MiB, plenty, gpu_budget=80 * MiB)  # nothing held on that one
        with pytest.raises(MemoryBudgetExceeded, match=r"needs 32.0 MiB on cuda:0, which has 16.0 MiB free of 80"):
            admit("scorer", other, 32 * MiB, (16 * MiB, 80 << 30), gpu_budget=None)
    finally:
        lease.close()
    assert _wait_for(lambda: not held.start.exists())


def test_keeper_status_is_json_a_reader_can_use(shm_dir: Path) -> None:
    shm_dir.mkdir(mode=0o700)
    files = DeviceCopyFiles(SegmentName(shm_dir, "m--cdef"), "ab" * 16, index=2)
    fd = _workers.memfd_with(MiB, b"w")
    with files.starting():
        lease = start_keeper(files, fd, nbytes=MiB, fingerprint="f" * 64, read_only=False, key="m")
    os.close(fd)
    try:
        status = json.loads(files.status.read_bytes())
        assert status["device"] == "cuda:2" and status["uuid"] == "ab" * 16 and status["holders"] == [os.getpid()]
        assert files.status.name == "m--cdef.gpu-abababababab.gpu"  # named by the physical GPU
        out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), "ls", "--json", "--gpu"],
                             capture_output=True, text=True, check=True).stdout
        assert json.loads(out)[0]["holders"] == [os.getpid()]
    finally:
        lease.close()
    assert _wait_for(lambda: not files.start.exists())
