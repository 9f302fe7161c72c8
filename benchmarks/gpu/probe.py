"""A first look at a GPU machine for GPU copies: can its driver do what ``modelshare._gpu.cuda`` needs,
and how does NVML account for memory that several processes map?

    python -m benchmarks.gpu.probe

One process allocates 64 MiB with CUDA VMM, fills it, exports it and starts a keeper; a spawned
process maps it through the keeper, builds a torch tensor over it and checks the values; then the
maker unmaps and lets go, and the other process checks again (the memory must outlive its maker).
NVML's device and per-process figures are read at each step. Prints one JSON object; every step
that fails is recorded with its error instead of stopping the probe.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from modelshare import memory

from ..models import MiB


def _nvml(pids: list[int]) -> dict[str, Any]:
    gpu = memory.gpus()[0]
    return {"used_mib": gpu.used / MiB, "per_process_mib": {str(p): gpu.processes.get(p, 0) / MiB for p in pids}}


def _expected(nbytes: int) -> np.ndarray:
    return np.arange(nbytes // 4, dtype=np.float32)


def mapper(directory: str, stem: str, gpu: str, results: Any, again: Any) -> None:
    """Map the copy through its keeper, read it as a torch tensor; again after the maker let go."""
    import torch

    from modelshare._gpu.cuda import driver
    from modelshare._gpu.keeper import DeviceCopyFiles, request_copy
    from modelshare._host.directory import SegmentName
    from modelshare.codecs._torch_storage import _DeviceBytes

    try:
        lease, about, fd = request_copy(DeviceCopyFiles(SegmentName(Path(directory), stem), gpu))
        address = driver("probe").import_mapped(0, fd, about["nbytes"], about["read_only"])
        os.close(fd)
        torch.cuda.init()
        raw = torch.as_tensor(_DeviceBytes(address, about["nbytes"], None), device="cuda:0")
        values = raw[: 64 * MiB].view(torch.float32)
        expected = torch.from_numpy(_expected(64 * MiB)).to("cuda:0")
        results.put({"mapped": True, "device_of_tensor": str(raw.device), "equal": bool(torch.equal(values, expected))})
        again.wait(60)
        results.put({"equal_after_maker_left": bool(torch.equal(values, expected))})
        lease.close()
    except Exception as exc:  # noqa: BLE001 -- the probe reports, it does not stop
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def main() -> int:
    from modelshare._gpu.cuda import driver
    from modelshare._gpu.keeper import DeviceCopyFiles, start_keeper
    from modelshare._host.directory import SegmentName

    report: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="modelshare-probe-", dir="/dev/shm"))
    try:
        cuda = driver("probe")
        report["devices"] = cuda.device_count
        gpu = cuda.uuid(0)
        report["uuid"], report["uuid_matches_nvml"] = gpu, gpu == memory.gpus()[0].uuid
        report["before"] = _nvml([os.getpid()])
        nbytes = cuda.rounded(0, 64 * MiB)
        address, fd = cuda.create(0, nbytes)
        data = _expected(64 * MiB)
        cuda.copy_in(0, address, data.ctypes.data, data.nbytes)
        cuda.synchronize(0)
        try:
            cuda.set_access(0, address, nbytes, read_only=True)
            report["read_only_access"] = True
        except Exception as exc:  # noqa: BLE001
            report["read_only_access"] = f"{type(exc).__name__}: {exc}"
        report["after_create"] = _nvml([os.getpid()])
        files = DeviceCopyFiles(SegmentName(directory, "probe--0"), gpu)
        with files.starting():
            lease = start_keeper(files, fd, nbytes=nbytes, fingerprint="0" * 64,
                                 read_only=report["read_only_access"] is True, key="probe")
        os.close(fd)
        ctx = multiprocessing.get_context("spawn")
        results, again = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=mapper, args=(str(directory), "probe--0", gpu, results, again))
        child.start()
        report["mapper"] = results.get(timeout=120)
        report["both_mapped"] = _nvml([os.getpid(), child.pid])
        cuda.unmap(0, address, nbytes)
        lease.close()
        time.sleep(0.5)
        report["maker_let_go"] = _nvml([os.getpid(), child.pid])
        again.set()
        report["mapper"].update(results.get(timeout=60))
        child.join(60)
        time.sleep(1.0)
        report["all_gone"] = _nvml([os.getpid()])
        report["keeper_files_left"] = sorted(p.name for p in directory.iterdir())
    except Exception as exc:  # noqa: BLE001
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
