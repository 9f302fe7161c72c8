"""Host memory accounting: what the machine has, what each process really uses, what segments hold.

The numbers tests and benchmarks assert on. RSS counts a shared page in every process that maps
it, so N processes on one segment look like N copies; the figures here avoid that:

* **USS** (unique set size): pages only this process maps -- its private cost.
* **PSS** (proportional set size): private pages plus each shared page divided by the number of
  processes that map it. Summed over processes, a segment is counted once.
* **segment bytes**: what the files in a segment directory occupy in tmpfs (memory, not disk).
  Weights a segment maps from their own file (``Processes(map_files=...)``) are page cache, not
  tmpfs: they count in each process's ``segment_pss``, not here.
* **GPUs**: used and free per device, and per process, through NVML, where ``nvidia-ml-py`` and a
  GPU are present; ``gpu_usage`` counts a GPU copy (``Processes(device=...)``) once for the
  processes that share it.
* **peaks**: ``Peak(read)`` samples any of these in the background and keeps the largest.

Example::

    from modelshare import memory
    total = sum(memory.process(pid).pss for pid in worker_pids)
    assert total < memory.segment_bytes() + budget
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

from ._host.directory import COUNTS_FILE, default_directory

__all__ = ["HostMemory", "ProcessMemory", "GpuMemory", "Peak", "host", "process", "total_pss", "anonymous_bytes",
           "segment_bytes", "gpus", "gpu_usage"]


@dataclass(frozen=True)
class HostMemory:
    """Machine-wide memory in bytes (``available`` is what can be used without swapping)."""

    total: int
    available: int
    used: int


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory in bytes; ``segment_pss`` / ``segment_uss`` are the parts of ``pss`` /
    ``uss`` in segment files (a segment only this process maps is in its USS too)."""

    pid: int
    rss: int
    uss: int
    pss: int
    segment_pss: int
    segment_uss: int = 0

    @property
    def private(self) -> int:
        """What this process costs the machine on its own, segments left out: its USS outside them."""
        return self.uss - self.segment_uss


def host() -> HostMemory:
    """The machine's total, available and used memory."""
    import psutil  # imported where used, here and below: ~1.6 MiB in every process that imports modelshare

    vm = psutil.virtual_memory()
    return HostMemory(total=vm.total, available=vm.available, used=vm.total - vm.available)


def _mapped_files(directory: Path) -> set[tuple[str, int]]:
    """The weights files that segments in ``directory`` map, as smaps names them: (dev "MM:mm" in
    hex, inode)."""
    from ._host.inventory import list_segments

    return {(f"{os.major(f.dev):02x}:{os.minor(f.dev):02x}", f.ino)
            for info in list_segments(directory) for f in info.files}


def _segment_memory(pid: int, directory: Path) -> tuple[int, int]:
    """(PSS, USS) of the mappings of files under ``directory`` and of the weights files its segments
    map, from ``/proc/<pid>/smaps``."""
    prefix = str(directory).rstrip("/") + "/"
    mapped = _mapped_files(directory) if directory.is_dir() else set()
    pss = uss = 0
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    fields = line.split(None, 5)
                    inside = len(fields) == 6 and (fields[5].startswith(prefix)
                                                   or (fields[3], int(fields[4])) in mapped)
                elif inside and line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif inside and line.startswith(("Private_Clean:", "Private_Dirty:")):
                    uss += int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        import psutil

        raise psutil.NoSuchProcess(pid) from None
    return pss, uss


def process(pid: Optional[int] = None, directory: Union[str, os.PathLike[str], None] = None) -> ProcessMemory:
    """RSS, USS, PSS of process ``pid`` (default: this one), and its PSS and USS in segments."""
    import psutil

    pid = os.getpid() if pid is None else pid
    info = psutil.Process(pid).memory_full_info()
    seg_dir = Path(directory) if directory is not None else default_directory()
    segment_pss, segment_uss = _segment_memory(pid, seg_dir)
    return ProcessMemory(pid=pid, rss=info.rss, uss=info.uss, pss=info.pss, segment_pss=segment_pss,
                         segment_uss=segment_uss)


def total_pss(pids: Iterable[int], *, descendants: bool = False) -> int:
    """Sum of PSS over ``pids`` (with ``descendants``: and every process below them, each once):
    what this set of processes costs the machine, shared pages once. Processes that exit
    meanwhile are skipped."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *(root.children(recursive=True) if descendants else [])]:
                procs[proc.pid] = proc
        except psutil.NoSuchProcess:
            if not descendants:
                raise
    total = 0
    for proc in procs.values():
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            if not descendants:
                raise
    return total


def anonymous_bytes(pid: Optional[int] = None) -> int:
    """Resident anonymous memory of process ``pid`` (default: this one): its heap and private
    copies, not mapped files or segments (``RssAnon`` in ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """``with Peak(read, every=0.1) as peak:`` -- ``peak.value`` is the largest ``read()`` seen,
    sampled every ``every`` seconds in a background thread."""

    def __init__(self, read: Callable[[], int], every: float = 0.1) -> None:
        self.read, self.every, self.value = read, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.value = max(self.value, self.read())
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def segment_bytes(directory: Union[str, os.PathLike[str], None] = None) -> int:
    """Bytes of memory the files in a segment directory occupy (allocated blocks, not sizes) --
    segments, their locks and files being written; not the counts file beside them."""
    seg_dir = Path(directory) if directory is not None else default_directory()
    total = 0
    try:
        entries = list(os.scandir(seg_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name == COUNTS_FILE:
            continue
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory in bytes, from NVML; ``processes``: NVML's figure for each process using it."""

    index: int
    total: int
    used: int
    free: int
    processes: dict[int, int] = field(default_factory=dict)
    uuid: str = ""  # hex, as modelshare names GPU copies (NVML's "GPU-..." without prefix and dashes)


_said_why_no_gpus: set[str] = set()


def _no_gpus(why: str) -> list[GpuMemory]:
    """``[]``, having said why once per process (a warning): no figures is not the same as no GPU."""
    if why not in _said_why_no_gpus:
        _said_why_no_gpus.add(why)
        warnings.warn(f"modelshare.memory.gpus(): no GPU figures: {why}", RuntimeWarning, stacklevel=3)
    return []


def gpus() -> list[GpuMemory]:
    """Every GPU's memory (and each process's on it) through NVML (``nvidia-ml-py``, never
    ``nvidia-smi``); empty where there is no NVML or no GPU -- saying why once, as a warning."""
    try:
        import pynvml  # nvidia-ml-py: optional, never a dependency of the core
    except ImportError:
        return _no_gpus('nvidia-ml-py is not installed (pip install "modelshare[gpu]")')
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _no_gpus(f"NVML cannot start ({exc}): no NVIDIA driver, or no GPU, on this machine")
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            processes = {int(p.pid): int(p.usedGpuMemory or 0)
                         for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = (uuid.decode() if isinstance(uuid, bytes) else uuid).removeprefix("GPU-").replace("-", "").lower()
            found.append(GpuMemory(index, int(info.total), int(info.used), int(info.free), processes, uuid))
        return found
    finally:
        pynvml.nvmlShutdown()


def gpu_usage(pids: Iterable[int], index: int = 0, directory: Union[str, os.PathLike[str], None] = None) -> int:
    """GPU memory that the processes ``pids`` cost GPU ``index`` (NVML's numbering), each GPU copy they
    hold counted once.

    NVML charges a copy's memory to the process that allocated it, and to nobody once that process
    is gone (the memory lives on for the others); so a copy held by the set is added unless its
    maker is in the set and still listed by NVML.
    """
    from ._gpu.keeper import list_device_copies

    wanted = set(pids)
    found = [g for g in gpus() if g.index == index]
    if not found:
        return 0
    listed, uuid = found[0].processes, found[0].uuid
    total = sum(listed.get(pid, 0) for pid in wanted)
    seg_dir = Path(directory) if directory is not None else default_directory()
    for copy in list_device_copies(seg_dir):
        if copy.uuid == uuid and copy.alive and wanted & set(copy.holders):
            if not (copy.creator in wanted and copy.creator in listed):
                total += copy.nbytes
    return total
