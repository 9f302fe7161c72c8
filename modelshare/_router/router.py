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
* A small ledger beside the segments (``ledger``, locked for every decision) keeps what the
  directory cannot: when each model was last used, its size from its last load (the estimate
  before the next one), reservations, and counters (loads, hits, evictions).
* Before a load (``admission``): its size (from the ledger, else ``sizes=``, else the largest known
  size) times ``load_overhead`` (a loader's private copy beside the segment it writes, while it
  loads) plus what is held must fit the budget and the machine's available memory; otherwise the
  least recently used segments that no process holds are unlinked, oldest first; otherwise the
  call waits for models in use to be released (``wait``), then :class:`MemoryBudgetExceeded`
  names the model, its size, the budget and what holds it. A model larger than the whole budget
  fails at once. A model in use is never evicted: using it holds its segment's shared lock, and
  eviction needs the exclusive one.
* Released models stay loaded (``keep_warm``) until evicted, or until the last process using a
  router in the directory exits (``membership``; ``modelshare gc`` after a SIGKILL). Loads stay
  single-flight per machine (``SharedModel``'s own locks).

Models share the router's directory and ``share="processes"``. GPU budgets
(``Budget(gpu={0: "20GiB"})``) apply to the models placed on a GPU (``Processes(device=...)``):
a GPU copy lives only while some process holds the model (``_gpu.copies``), so nothing needs
evicting there -- a copy that does not fit waits, like a full host budget, for copies in use to be
released, then :class:`MemoryBudgetExceeded` names them. Their host segments stay warm under the
host budget, so a model coming back to a GPU is copied from memory, not loaded again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

from .._host import counts
from .._host.directory import SegmentName, default_directory
from .._host.heap import reclaim_heap
from .._host.holds import forget_lingering
from .._host.inventory import evict, segment_sizes
from .._host.locks import lock_holders, lock_table
from .._host.trust import ensure_directory
from .._host.waiting import Deadline
from .._log import Log
from .._modes.processes import Processes
from .._shared import SharedModel
from ..budget import Budget, Size, format_size, parse_size
from ..errors import AdmissionRefused, GpuMemoryExceeded, MemoryBudgetExceeded
from ..memory import Peak, anonymous_bytes
from . import admission
from .ledger import Ledger, LedgerState, Reservation
from .membership import join

_log = Log(__name__)

__all__ = ["ModelRouter", "KeyStats"]


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


@dataclass(frozen=True)
class _NoRoom:
    """Why a model cannot be admitted now (models in use fill the budget): wait, or give up."""

    reason: str


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

    The router keeps its own copy of each model (``keep_warm=True``; the GPU budget of its device
    applied): the SharedModel objects passed in are not changed.
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
        self._budget_counted = False
        for key, shared in (models or {}).items():
            self._add(key, shared)

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = default_directory()
        return self._directory

    def _add(self, key: str, shared: SharedModel[Any]) -> SharedModel[Any]:
        if not isinstance(shared, SharedModel) or not isinstance(shared.mode, Processes):
            raise TypeError(f"the router's model for {key!r} must be a SharedModel(share='processes'), "
                            f"not {shared!r}")
        if self._directory is None:
            self._directory = shared.directory
        if shared.directory != self._directory:
            raise ValueError(f"the model for {key!r} lives in {shared.directory}, the router in {self._directory}: "
                             "a budget is kept per directory, give every model the same one")
        mode = shared.mode
        if mode.device is not None:  # its GPU copy counts against that GPU's budget (see _gpu.copies)
            gpu = self.budget.gpu.get(int(mode.device.partition(":")[2]))
            if gpu is not None:
                own = None if mode.gpu_budget is None else parse_size(mode.gpu_budget)
                mode = dataclasses.replace(mode, gpu_budget=gpu if own is None else min(gpu, own))
        # a released model stays loaded until the budget needs its room; its exact size is admitted
        # before its segment is written
        routed = shared._with(keep_warm=True, mode=mode, linger=0.0)  # the router keeps models warm itself
        routed._admit_publish = functools.partial(self._admit_publish, key, routed.segment_name.stem)
        self._models[key] = routed
        return routed

    def model(self, key: str) -> SharedModel[Any]:
        """The router's SharedModel for ``key`` (from ``models``, else made by ``factory``)."""
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
        ledger = Ledger(ensure_directory(self.directory))
        join(self.directory)
        if not self._budget_counted:  # what metrics show as the budget: the latest router's
            self._budget_counted = True
            limits = {"host": self.budget.host, **{f"cuda:{i}": b for i, b in self.budget.gpu.items()}}
            counts.set_budget(self.directory, {memory: b for memory, b in limits.items() if b is not None})
        deadline = Deadline(self.wait, longest=0.1)
        while True:
            outcome = self._try_acquire(key, shared, name, ledger)
            if not isinstance(outcome, _NoRoom):
                return outcome
            if deadline.expired():
                raise MemoryBudgetExceeded(f"{outcome.reason} (waited {self.wait:g} s for models in use to be "
                                           "released)")
            deadline.sleep()

    def _try_acquire(self, key: str, shared: SharedModel[Any], name: SegmentName,
                     ledger: Ledger) -> Union[tuple[SharedModel[Any], Any], _NoRoom]:
        with ledger.locked() as state:
            record = state.record(name.stem, key)
            if name.seg_path.exists():  # a hit: attach under the ledger lock, so it cannot be evicted first
                model = _acquire_within_gpu_budget(shared)
                if isinstance(model, _NoRoom):
                    return model
                record.hits += 1
                record.last_used = time.time()
                record.bytes = _file_size(name.seg_path) or record.bytes  # what it really takes
                return shared, model
            admitted = self._admit(state, key, name)
            if isinstance(admitted, _NoRoom):
                return admitted
            record.last_used = time.time()
        reclaim_heap()  # freed heap pages still resident would take the loader's copy unseen: no growth to measure
        start = anonymous_bytes()
        try:
            with Peak(anonymous_bytes, every=0.002) as peak:  # what the load costs this process beside the segment
                model = _acquire_within_gpu_budget(shared)  # single-flight per machine; the ledger is free meanwhile
        except AdmissionRefused as refused:  # its exact size does not fit now: nothing was written
            with ledger.locked() as state:
                _drop_own_reservation(state, name.stem)
            return _NoRoom(str(refused))
        except BaseException:
            with ledger.locked() as state:
                _drop_own_reservation(state, name.stem)
            raise
        info = shared.hold_info()
        with ledger.locked() as state:
            _drop_own_reservation(state, name.stem)
            if isinstance(model, _NoRoom):
                return model
            record = state.record(name.stem, key)
            record.bytes = _file_size(name.seg_path) or record.bytes
            record.loads += 1
            if info is not None and info.loaded_here:
                record.load_bytes = record.bytes + max(0, peak.value - start)  # its next load reserves this much
        return shared, model

    def _admit_publish(self, key: str, stem: str, size: int) -> None:
        """A loaded model's exact segment size, checked before a byte is written (whoever loads it:
        this process's load, or one that took over a dead loader's): room is made and reserved, or
        :class:`AdmissionRefused` (nothing is written; the router waits, the size now known), or
        :class:`MemoryBudgetExceeded` if it is larger than the whole budget."""
        with Ledger(self.directory).locked() as state:
            state.record(stem, key).bytes = size  # remembered, refused or not: the next admission knows
            too_big = self.budget.host is not None and size > self.budget.host
            no_room = None if too_big else self._make_room(state, size, exclude=stem, key=key)
            if too_big or no_room is not None:
                _drop_own_reservation(state, stem)
            else:
                state.reservations[stem] = Reservation.here(size)  # until the segment is there to count
        if too_big:
            raise MemoryBudgetExceeded(self._too_big(key, size))
        if no_room is not None:
            raise AdmissionRefused(no_room.reason)

    # -- admission ------------------------------------------------------------------------------

    def _too_big(self, key: str, size: int) -> str:
        return (f"model {key!r} needs {format_size(size)}, more than the whole host budget of "
                f"{format_size(self.budget.host or 0)}: raise Budget(host=...) or make the model smaller")

    def _admit(self, state: LedgerState, key: str, name: SegmentName) -> Union[int, _NoRoom]:
        """Make room for ``key`` (evicting if needed) and reserve what its load needs; its size as
        estimated (0 when nothing is known: the exact size is checked before publishing)."""
        reservation = state.live_reservations().get(name.stem)
        if reservation is not None:
            return reservation.bytes  # another process is loading it: this one will attach (or take over)
        hint = self._hint(key)
        size = admission.size_estimate(state.models, name.stem, key, hint)
        if size is None:  # nothing measured yet: all the room there is -- whatever nobody holds goes
            self._make_room(state, self.budget.host or 0, exclude=name.stem, key=key, best_effort=True)
            state.reservations[name.stem] = Reservation.here(0)
            return 0
        known = bool(state.models[name.stem].bytes) or hint is not None
        if self.budget.host is not None and size > self.budget.host and known:
            raise MemoryBudgetExceeded(self._too_big(key, size))
        need = admission.load_need(state.models, name.stem, size, self.load_overhead)
        if self.budget.host is not None:
            need = min(need, self.budget.host)  # an estimate above the budget: this load runs alone
        no_room = self._make_room(state, need, exclude=name.stem, key=key)
        if no_room is not None:
            return no_room
        state.reservations[name.stem] = Reservation.here(need)
        return size

    def _hint(self, key: str) -> Optional[int]:
        """The size ``sizes=`` gives for ``key``, if any."""
        hint = self._sizes(key) if callable(self._sizes) else self._sizes.get(key)
        return None if hint is None else parse_size(hint)

    def _held(self, state: LedgerState, exclude: str = "") -> dict[str, int]:
        """Bytes held in the directory by stem (one listing): segments, and segments being written,
        or the reservations of live loads where larger; ``exclude`` left out."""
        sizes = segment_sizes(self.directory)
        for stem, reservation in state.live_reservations().items():
            sizes[stem] = max(sizes.get(stem, 0), reservation.bytes)
        sizes.pop(exclude, None)
        return sizes

    def _make_room(self, state: LedgerState, size: int, *, exclude: str, key: str,
                   best_effort: bool = False) -> Optional[_NoRoom]:
        """Evict unheld models, least recently used first, until ``size`` more bytes fit beside what
        is held (``exclude`` not counted); why not, if they cannot. ``best_effort``: evict every
        unheld model when they cannot (and say nothing)."""
        held = self._held(state, exclude)
        last_used = {stem: record.last_used for stem, record in state.models.items()}
        in_use = {stem for stem in state.live_reservations() if stem != exclude}
        import psutil  # here: not a cost of importing modelshare

        while True:
            available = psutil.virtual_memory().available
            plan = admission.plan(size, held, in_use, last_used, self.budget.host, available, best_effort=best_effort)
            for stem in plan.evict:
                name = SegmentName(self.directory, stem)
                forget_lingering(name)  # this process's leftover references do not count as use
                if not evict(name):
                    in_use.add(stem)  # attached meanwhile: plan again without it
                    break
                _log.info("evicted %s (%s) to make room for %r (%s) under the budget", stem, format_size(held[stem]),
                          key, format_size(size))
                counts.add(self.directory, name.key, "evictions")
                del held[stem]
                if stem in state.models:
                    state.models[stem].evictions += 1
            else:
                if plan.fits or best_effort:
                    return None
                return self._no_room(state, key, size, held, available)

    def _no_room(self, state: LedgerState, key: str, size: int, held: dict[str, int], available: int) -> _NoRoom:
        locks = lock_table()
        holders = {state.models[stem].key if stem in state.models else stem:
                   lock_holders(SegmentName(self.directory, stem).lock_path, locks) for stem in held}
        in_use = ", ".join(f"{k} (pids {p})" for k, p in holders.items() if p) or "nothing"
        budget = format_size(self.budget.host) if self.budget.host is not None else "none"
        return _NoRoom(
            f"model {key!r} needs {format_size(size)}; the host budget is {budget}, "
            f"{format_size(sum(held.values()))} is held by models in use -- {in_use} -- and "
            f"{format_size(available)} is available on the machine. Release models, raise Budget(host=...), or "
            "route fewer keys at once")

    # -- reading ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, KeyStats]:
        """Per key, machine-wide: loads, hits, evictions, bytes, last use, loaded now, holders."""
        state = Ledger(ensure_directory(self.directory)).read()
        result, locks = {}, lock_table()
        for stem, r in state.models.items():
            name = SegmentName(self.directory, stem)
            result[r.key] = KeyStats(r.key, r.loads, r.hits, r.evictions, r.bytes, r.last_used,
                                     name.seg_path.exists(), lock_holders(name.lock_path, locks))
        return result

    def held_bytes(self) -> int:
        """Bytes of models held in the router's directory now."""
        return sum(segment_sizes(self.directory).values())


def _drop_own_reservation(state: LedgerState, stem: str) -> None:
    """Remove this process's reservation for ``stem`` (another process's is its own to remove)."""
    reservation = state.reservations.get(stem)
    if reservation is not None and reservation.pid == os.getpid():
        del state.reservations[stem]


def _acquire_within_gpu_budget(shared: SharedModel[Any]) -> Any:
    """``shared.acquire()``; a GPU copy that does not fit (its budget, or the GPU's free memory) is
    waited for like a full host budget (``_NoRoom``): GPU copies go with their last holder, so room
    comes back."""
    try:
        return shared.acquire()
    except GpuMemoryExceeded as exc:
        return _NoRoom(str(exc))


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
