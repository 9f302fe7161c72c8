"""ModelRouter: many models by key, held under a byte budget per machine, evicting the least
recently used model that no process is using.

"Several models trained differently do the same task": each element goes to the model for its
key. Counting models per process (Beam's ``max_models_per_worker_hint``) multiplies by the
processes and ignores sizes; the router counts bytes, once per machine::

    router = ModelRouter({"en": SharedModel(load_en, key="en"), "de": ...}, budget=Budget(host="4GiB"))
    with router.use("de") as model:
        model.predict(batch)

How the budget holds across every process that routes through the same directory:

* What is held is read from the directory itself: the sizes of the segments in it (and of those
  being published), plus reservations of loads in progress by live processes. Segments are
  shared and their holders are kernel locks, so a SIGKILLed process cannot leave the count wrong.
* A small ledger beside the segments (``router.ledger``, ``flock``-ed for every decision) keeps
  what the directory cannot: when each model was last used, its size from its last load (the
  estimate before the next one), reservations, and counters (loads, hits, evictions).
* Before a load: its size (from the ledger, else ``sizes=``, else the largest known size) times
  ``load_overhead`` (a loader's private copy beside the segment it writes, while it loads) plus
  what is held must fit the budget and the machine's available memory; otherwise the least
  recently used segments that no process holds are unlinked, oldest first; otherwise the call
  waits for models in use to be released (``wait``), then :class:`MemoryBudgetExceeded` names the
  model, its size, the budget and what holds it. A model larger than the whole budget fails at
  once. A model in use is never evicted: using it
  holds its segment's shared lock, and eviction needs the exclusive one.
* Released models stay loaded (``keep_warm``) until evicted, or until the last process using a
  router in the directory exits (each holds a shared lock on ``router.users``; the last one out,
  or ``modelshare gc`` after a SIGKILL, evicts them). Loads stay single-flight per machine
  (``SharedModel``'s own locks).

Models share the router's directory and ``share="processes"``. GPU budgets
(``Budget(gpu={0: "20GiB"})``) apply to the models placed on a GPU (``SharedModel(device=...)``):
a GPU copy lives only while some process holds the model (``_device_copy``), so nothing needs
evicting there -- a copy that does not fit waits, like a full host budget, for copies in use to be
released, then :class:`MemoryBudgetExceeded` names them. Their host segments stay warm under the
host budget, so a model coming back to a GPU is copied from memory, not loaded again.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import psutil

from . import _segment
from ._budget import Budget, GpuMemoryExceeded, MemoryBudgetExceeded, Size, format_size, parse_size
from ._shared import SharedModel

__all__ = ["ModelRouter", "KeyStats"]

LEDGER = "router.ledger"
USERS = "router.users"  # every process using a router in the directory holds a shared flock on it

_users: dict[Path, int] = {}
_users_lock = threading.Lock()


def _join(directory: Path) -> None:
    """Count this process among the directory's router users (for life): the last one to leave
    evicts the models the routers kept warm."""
    with _users_lock:
        if directory in _users:
            return
        fd = os.open(directory / USERS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a last user is sweeping
        if not _users:
            atexit.register(_leave_all)
        _users[directory] = fd


def _leave_all() -> None:
    with _users_lock:
        held = list(_users.items())
        _users.clear()
    for directory, fd in held:
        os.close(fd)
        sweep_router(directory)


def sweep_router(directory: Path) -> list[Path]:
    """If no process uses a router in ``directory`` any more (a SIGKILLed last user included),
    evict the models routers kept warm there; what was removed."""
    if not (directory / LEDGER).exists():
        return []
    try:
        fd = os.open(directory / USERS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # routers are in use: their models stay
        removed = []
        with _Ledger(directory).locked() as state:
            for stem in list(state["models"]):
                name = _segment.SegmentName(directory, stem)
                if name.seg_path.exists() and _segment.evict(name):
                    removed.append(name.seg_path)
                if not name.seg_path.exists():
                    del state["models"][stem]  # the routers are gone: their models' records go with them
            state["reservations"].clear()
        return removed
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KeyStats:
    """What the router has done for one key, machine-wide."""

    key: str
    loads: int
    hits: int
    evictions: int
    nbytes: int
    last_used: float
    loaded: bool
    holders: list[int]


class _NoRoom(Exception):
    """Nothing that could be evicted makes room now (models in use): wait, or give up."""


class _Ledger:
    """The ledger file, read and written under its exclusive flock (one decision at a time)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LEDGER

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Any]]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "r+") as f:
                try:
                    state = json.loads(f.read() or "{}")
                except json.JSONDecodeError:
                    state = {}  # torn by a SIGKILL mid-write: sizes and times are re-learned
                state.setdefault("models", {})
                state.setdefault("reservations", {})
                yield state
                f.seek(0)
                f.truncate()
                f.write(json.dumps(state))
        finally:
            os.close(fd)


class ModelRouter:
    """Models by key under a machine-wide byte budget (see the module docstring).

    Args:
        models: key -> ``SharedModel`` (``share="processes"``, all in one directory).
        budget: the byte budget (``Budget(host="4GiB")``).
        factory: for keys not in ``models``: ``factory(key)`` returns its ``SharedModel``.
        sizes: expected bytes per key (a mapping, or a function of the key returning a size or
            None), used before a key's first load has measured it; without one, the largest size
            measured for another version of the key, else the largest measured so far, else (the
            very first load) the load runs alone.
        wait: seconds to wait for models in use to be released when the budget is full, before
            :class:`MemoryBudgetExceeded`.
        load_overhead: how many times its size a model takes while it loads. None (the default):
            measured -- the loading process's anonymous memory is sampled, and what a key's load cost
            is reserved for its next load (other keys: the largest ratio measured; before any
            measurement: 2, a loader that builds the model privately beside the segment it writes).
            A number: that factor, always (1 for loaders that memory-map their file, such as
            ``torch.load(mmap=True)`` or ``joblib.load(mmap_mode="r")``).
        directory: the segment directory (default: the models', else the default directory).
    """

    def __init__(self, models: Optional[Mapping[str, SharedModel[Any]]] = None, *, budget: Budget,
                 factory: Optional[Callable[[str], SharedModel[Any]]] = None,
                 sizes: Union[Mapping[str, Size], Callable[[str], Optional[Size]], None] = None,
                 directory: Optional[os.PathLike[str]] = None, wait: float = 60.0,
                 load_overhead: Optional[float] = None) -> None:
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a modelshare.Budget, e.g. Budget(host='4GiB'), not {budget!r}")
        self.budget = budget
        self.wait = float(wait)
        if load_overhead is not None and load_overhead < 1:
            raise ValueError(f"load_overhead is at least 1 (the segment itself), not {load_overhead}")
        self.load_overhead = load_overhead
        self._models: dict[str, SharedModel[Any]] = {}
        self._factory = factory
        self._sizes = sizes if callable(sizes) else {k: parse_size(v) for k, v in (sizes or {}).items()}
        self._directory = Path(directory) if directory is not None else None
        self._lock = threading.Lock()
        for key, shared in (models or {}).items():
            self._add(key, shared)

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = _segment.default_directory()
        return self._directory

    def _add(self, key: str, shared: SharedModel[Any]) -> SharedModel[Any]:
        if not isinstance(shared, SharedModel) or shared.share != "processes":
            raise TypeError(f"the router's model for {key!r} must be a SharedModel(share='processes'), "
                            f"not {shared!r}")
        if self._directory is None:
            self._directory = shared.directory
        if shared.directory != self._directory:
            raise ValueError(f"the model for {key!r} lives in {shared.directory}, the router in {self._directory}: "
                             "a budget is kept per directory, give every model the same one")
        shared.keep_warm = True  # a released model stays loaded until the budget needs its room
        if shared.device is not None:  # its GPU copy counts against that GPU's budget (see _device_copy)
            gpu = self.budget.gpu.get(int(shared.device.partition(":")[2]))
            if gpu is not None:
                shared.gpu_budget = gpu if shared.gpu_budget is None else min(gpu, shared.gpu_budget)
        self._models[key] = shared
        return shared

    def model(self, key: str) -> SharedModel[Any]:
        """The SharedModel for ``key`` (from ``models``, else made by ``factory``)."""
        with self._lock:
            if key in self._models:
                return self._models[key]
            if self._factory is None:
                raise KeyError(f"no model for key {key!r}: the router has {sorted(self._models)} and no factory")
            return self._add(key, self._factory(key))

    # -- use ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, key: str) -> Iterator[Any]:
        """``with router.use(key) as model:`` -- the model for ``key``, loaded within the budget.

        A released model that a process still refers to stays held there (it is still mapped): other
        processes' routers wait for it instead of evicting memory in use. This process's own
        leftovers -- a ``model`` name still bound after the block while the next key is admitted --
        do not count: drop them (``del model``, or use ``router(key, x)``) and the memory goes."""
        shared, model = self.acquire(key)
        try:
            yield model
        finally:
            shared.release(model)

    def __call__(self, key: str, *args: Any, **kwargs: Any) -> Any:
        """``router(key, x)``: call the model for ``key`` once."""
        with self.use(key) as model:
            return model(*args, **kwargs)

    def acquire(self, key: str) -> tuple[SharedModel[Any], Any]:
        """The model for ``key`` and its SharedModel (``shared.release(model)`` when done).

        When the budget is taken by models in use, waits (up to ``wait`` seconds) for them to be
        released, then raises :class:`MemoryBudgetExceeded`.
        """
        shared = self.model(key)
        name = shared.segment_name
        ledger = _Ledger(_segment.ensure_directory(self.directory))
        _join(self.directory)
        deadline, delay = time.monotonic() + self.wait, 0.005
        while True:
            try:
                return self._try_acquire(key, shared, name, ledger)
            except _NoRoom as no_room:
                if time.monotonic() >= deadline:
                    raise MemoryBudgetExceeded(f"{no_room} (waited {self.wait:g} s for models in use to be "
                                               "released)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _try_acquire(self, key: str, shared: SharedModel[Any], name: _segment.SegmentName,
                     ledger: _Ledger) -> tuple[SharedModel[Any], Any]:
        with ledger.locked() as state:
            entry = state["models"].setdefault(name.stem, {"key": key, "loads": 0, "hits": 0, "evictions": 0,
                                                           "bytes": 0, "last_used": 0.0})
            if name.seg_path.exists():  # a hit: attach under the ledger lock, so it cannot be evicted first
                model = _acquire_within_gpu_budget(shared)
                entry["hits"] += 1
                entry["last_used"] = time.time()
                return shared, model
            reserved = self._admit(state, key, name)
            entry["last_used"] = time.time()
        try:
            with _AnonPeak() as peak:  # what the load costs this process beside the segment, if it loads
                model = _acquire_within_gpu_budget(shared)  # single-flight per machine; the ledger is free meanwhile
        except BaseException:
            with ledger.locked() as state:
                state["reservations"].pop(name.stem, None)
            raise
        info = shared.hold_info()
        with ledger.locked() as state:
            state["reservations"].pop(name.stem, None)
            entry = state["models"][name.stem]
            entry["bytes"] = _file_size(name.seg_path) or reserved
            entry["loads"] += 1
            if info is not None and info.loaded_here:
                entry["load_bytes"] = entry["bytes"] + peak.bytes  # the next load of it reserves this much
            try:
                self._make_room(state, 0, exclude=name.stem, key=key, loaded=entry["bytes"])
            except _NoRoom:
                shared.release(model)  # larger than its estimate, and nothing else can go: undo, and wait
                _segment.evict(name)
                raise
        return shared, model

    # -- admission ------------------------------------------------------------------------------

    def _estimate(self, state: dict[str, Any], key: str, stem: str) -> Optional[int]:
        models = state["models"]
        if models.get(stem, {}).get("bytes"):
            return models[stem]["bytes"]
        hint = self._hint(key)
        if hint is not None:
            return hint
        same_key = [m["bytes"] for m in models.values() if m.get("key") == key and m.get("bytes")]
        if same_key:
            return max(same_key)  # another version of this model
        known = [m["bytes"] for m in models.values() if m.get("bytes")]
        return max(known) if known else None

    def _admit(self, state: dict[str, Any], key: str, name: _segment.SegmentName) -> int:
        """Make room for ``key`` (evicting if needed) and reserve its estimated size."""
        reservation = state["reservations"].get(name.stem)
        if reservation and _alive(reservation):
            return int(reservation["bytes"])  # another process is loading it: this one will attach
        size = self._estimate(state, key, name.stem)
        if size is None:  # nothing measured yet: this load runs alone, with all the room there is
            held, _ = self._held(state, name.stem)
            size = max(0, (self.budget.host if self.budget.host is not None else held) - held)
            if held:
                raise _NoRoom(f"model {key!r} has no known size yet and waits for the budget to be free")
            need = size
        elif self.load_overhead is not None:  # while it loads: the loader's own copy beside the segment
            need = int(size * self.load_overhead)
        else:  # as its last load measured, else as the others' did
            need = state["models"].get(name.stem, {}).get("load_bytes") or int(size * self._load_ratio(state))
        known = bool(state["models"].get(name.stem, {}).get("bytes")) or self._hint(key) is not None
        if self.budget.host is not None and size > self.budget.host and known:
            raise MemoryBudgetExceeded(
                f"model {key!r} needs {format_size(size)}, more than the whole host budget of "
                f"{format_size(self.budget.host)}: raise Budget(host=...) or make the model smaller")
        if self.budget.host is not None:
            need = min(need, self.budget.host)  # an estimate above the budget: this load runs alone
        self._make_room(state, need, exclude=name.stem, key=key)
        state["reservations"][name.stem] = {"pid": os.getpid(), "started": _started(os.getpid()), "bytes": need}
        return size

    def _hint(self, key: str) -> Optional[int]:
        """The size ``sizes=`` gives for ``key``, if any."""
        hint = self._sizes(key) if callable(self._sizes) else self._sizes.get(key)
        return None if hint is None else parse_size(hint)

    @staticmethod
    def _load_ratio(state: dict[str, Any]) -> float:
        """Load cost over size: the largest measured on any model here, else 2."""
        ratios = [m["load_bytes"] / m["bytes"] for m in state["models"].values() if m.get("load_bytes") and m["bytes"]]
        return max(ratios) if ratios else 2.0

    def _held(self, state: dict[str, Any], exclude: str = "") -> tuple[int, dict[str, int]]:
        """Bytes held in the directory: segments (and segments being published) plus live reservations."""
        sizes: dict[str, int] = {}
        for info in _segment.list_segments(self.directory):
            file_name = info.path.name  # <key>--<hex version>.seg, or .seg.tmp-... while being published
            stem = file_name[: file_name.index(".", file_name.rindex("--"))]
            sizes[stem] = sizes.get(stem, 0) + info.nbytes
        for stem, reservation in list(state["reservations"].items()):
            if not _alive(reservation):
                del state["reservations"][stem]  # its loader died: its lock and temp file went with it
            elif stem != exclude:
                sizes[stem] = max(sizes.get(stem, 0), int(reservation["bytes"]))
        return sum(s for stem, s in sizes.items() if stem != exclude), sizes

    def _make_room(self, state: dict[str, Any], size: int, *, exclude: str, key: str, loaded: int = 0) -> None:
        """Evict unheld models, least recently used first, until ``size`` more bytes fit (``loaded``:
        the bytes of ``exclude``, just loaded, which count and stay); ``_NoRoom`` if they cannot."""
        held, sizes = self._held(state, exclude)
        held += loaded
        last_used = {stem: m.get("last_used", 0.0) for stem, m in state["models"].items()}
        victims = sorted((stem for stem in sizes if stem != exclude), key=lambda stem: last_used.get(stem, 0.0))
        available = psutil.virtual_memory().available
        for stem in victims:
            if self._fits(held, size, available):
                return
            name = _segment.SegmentName(self.directory, stem)
            _segment.forget_lingering(name)  # this process's leftover references do not count as use
            if _segment.evict(name):
                held -= sizes[stem]
                available += sizes[stem]
                if stem in state["models"]:
                    state["models"][stem]["evictions"] += 1
        if not self._fits(held, size, available):
            holders = {state["models"].get(stem, {}).get("key", stem): _segment.lock_holders(
                _segment.SegmentName(self.directory, stem).lock_path) for stem in sizes if stem != exclude}
            in_use = ", ".join(f"{k} (pids {p})" for k, p in holders.items() if p) or "nothing"
            budget = format_size(self.budget.host) if self.budget.host is not None else "none"
            raise _NoRoom(
                f"model {key!r} needs {format_size(size or loaded)}; the host budget is {budget}, "
                f"{format_size(held)} is held by models in use -- {in_use} -- and {format_size(available)} is "
                "available on the machine. Release models, raise Budget(host=...), or route fewer keys at once")

    def _fits(self, held: int, size: int, available: int) -> bool:
        within_budget = self.budget.host is None or held + size <= self.budget.host
        return within_budget and size <= available

    # -- reading ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, KeyStats]:
        """Per key, machine-wide: loads, hits, evictions, bytes, last use, loaded now, holders."""
        ledger = _Ledger(_segment.ensure_directory(self.directory))
        with ledger.locked() as state:
            models = dict(state["models"])
        result = {}
        for stem, m in models.items():
            name = _segment.SegmentName(self.directory, stem)
            result[m["key"]] = KeyStats(m["key"], m["loads"], m["hits"], m["evictions"], m["bytes"], m["last_used"],
                                        name.seg_path.exists(), _segment.lock_holders(name.lock_path))
        return result

    def held_bytes(self) -> int:
        """Bytes of models held in the router's directory now."""
        return sum(info.nbytes for info in _segment.list_segments(self.directory))


def _acquire_within_gpu_budget(shared: SharedModel[Any]) -> Any:
    """``shared.acquire()``; a GPU copy that does not fit (its budget, or the GPU's free memory) is
    waited for like a full host budget: GPU copies go with their last holder, so room comes back."""
    try:
        return shared.acquire()
    except GpuMemoryExceeded as exc:
        raise _NoRoom(str(exc)) from None


class _AnonPeak:
    """The peak of this process's anonymous memory over its level at entry (sampled every 2 ms):
    what a load costs beyond the segment (memory-mapped files and the segment are not anonymous)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> "_AnonPeak":
        self._start = _anon_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, _anon_bytes() - self._start)
            if self._stop.wait(0.002):
                return

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _started(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _alive(reservation: dict[str, Any]) -> bool:
    """Whether the process that made ``reservation`` still runs: the same process (not a reused
    pid), and not a zombie -- an exited worker its parent has not reaped yet holds no load."""
    try:
        process = psutil.Process(reservation["pid"])
        return (process.status() != psutil.STATUS_ZOMBIE
                and abs(process.create_time() - reservation.get("started", process.create_time())) < 1.0)
    except psutil.Error:
        return False


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
