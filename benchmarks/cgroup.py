"""A real kernel memory limit for one benchmark run: a memory cgroup (v1 or v2).

Every process of a run is started inside the cgroup (``wrap`` puts a command behind a tiny shell
that joins it before ``exec``), so the model loads, shared-memory segments (tmpfs pages are
charged to the cgroup of the process that writes them), Beam's model servers and all children
count against one limit. When the limit is hit the kernel's OOM killer SIGKILLs a process of the
run; ``oom_kills`` reads that from the cgroup, so the suite records it as a result.

Creating a cgroup needs root (or a delegated subtree). Where none can be made,
``MemoryCgroup.create`` raises ``CgroupUnavailable`` with the reason and the suite falls back to
reporting measured peaks against the limit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be created here; the message says why."""


def _own_v1_path() -> Path:
    """This process's memory cgroup (v1), so that a run's cgroup nests under it."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return V1_ROOT / path.lstrip("/")
    return V1_ROOT


class MemoryCgroup:
    """A memory cgroup with a hard limit and no swap; ``remove`` kills what is left and deletes it."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    @staticmethod
    def _parent() -> tuple[Path, int]:
        """Where this process may make memory cgroups, and the cgroup version."""
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            parent = _own_v1_path()
            return (parent if os.access(parent, os.W_OK) else V1_ROOT), 1
        if "memory" in _read(V2_ROOT / "cgroup.controllers", "").split():
            if "memory" not in _read(V2_ROOT / "cgroup.subtree_control", "").split():
                raise CgroupUnavailable(f"cgroup v2 at {V2_ROOT} does not delegate the memory controller "
                                        "(memory missing from cgroup.subtree_control)")
            return V2_ROOT, 2
        raise CgroupUnavailable("no memory cgroup hierarchy is mounted (neither cgroup v1 memory nor v2)")

    @classmethod
    def existing(cls, prefix: str) -> list["MemoryCgroup"]:
        """The cgroups whose names start with ``prefix`` (e.g. left by a killed run)."""
        try:
            parent, version = cls._parent()
        except CgroupUnavailable:
            return []
        return [cls(path, version) for path in parent.glob(prefix + "*") if path.is_dir()]

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> "MemoryCgroup":
        """A new cgroup ``name`` limited to ``limit_bytes``; ``CgroupUnavailable`` says why not."""
        parent, version = cls._parent()
        path = parent / name
        try:
            path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create a memory cgroup at {path}: {exc.strerror} "
                                    "(run as root, or in a cgroup subtree delegated to you)") from exc
        cgroup = cls(path, version)
        try:
            cgroup._set_limit(limit_bytes)
        except OSError as exc:
            cgroup.remove()
            raise CgroupUnavailable(f"cannot set a memory limit on {path}: {exc.strerror}") from exc
        return cgroup

    def _set_limit(self, limit_bytes: int) -> None:
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # no swapping out of the limit either
                memsw.write_text(str(limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")

    def wrap(self, command: Sequence[str]) -> list[str]:
        """``command``, started inside this cgroup (it joins before ``exec``, so from its first byte)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *command]

    def usage(self) -> int:
        """Bytes charged now (anonymous memory, page cache and tmpfs pages of the run)."""
        return int(_read(self.path / ("memory.usage_in_bytes" if self.version == 1 else "memory.current"), "0"))

    def in_use(self) -> int:
        """Bytes that cannot be reclaimed without killing: anonymous memory and tmpfs/shared memory
        (the charge also holds page cache, which the kernel drops under the limit before it OOM-kills)."""
        stats = dict(line.split(" ", 1) for line in _read(self.path / "memory.stat", "").splitlines() if " " in line)
        names = ("total_rss", "total_shmem") if self.version == 1 else ("anon", "shmem")
        return sum(int(stats.get(name, 0)) for name in names)

    def peak(self) -> int:
        """The most bytes charged at once since the cgroup was made."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int(_read(self.path / name, "0"))

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer has killed in this cgroup."""
        text = _read(self.path / ("memory.oom_control" if self.version == 1 else "memory.events"), "")
        for line in text.splitlines():
            field, _, value = line.partition(" ")
            if field == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.path / "cgroup.procs", "").split()]

    def remove(self, timeout: float = 10.0) -> None:
        """SIGKILL whatever still runs in the cgroup, then delete it."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _read(path: Path, default: str) -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def unavailable_reason() -> Optional[str]:
    """Why no memory cgroup can be made here, or None when one can (made and removed to find out)."""
    try:
        MemoryCgroup.create(f"modelshare-probe-{os.getpid()}", 1 << 30).remove()
    except CgroupUnavailable as exc:
        return str(exc)
    return None
