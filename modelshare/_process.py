"""This process's holds on shared models: one table, one at-fork hook, one exit hook.

The problem: what a process holds for modelshare -- shared locks on segments and their mappings,
connections to model servers, GPU copies, a directory's router membership -- belongs to the
process, not to the object that took it. Two events touch all of it at once:

* **fork**: the child inherits every descriptor, and an inherited descriptor shares its lock and
  its socket with the parent's. Left alone, a child's calls would interleave with its parent's
  on one connection (answers going to the wrong process), and a child letting go of a lock would
  let go of the parent's. So every resource says what a forked child does instead: take a lock
  of its own, or forget the parent's connection without disturbing it. A lock the child must
  hold from the first instant is taken by the parent just before the fork, on a descriptor of
  its own that only the child keeps: otherwise the parent, releasing right after the fork, would
  find no other holder (the child's inherited lock is the parent's own) and unlink the segment.
* **exit**: a process that leaves without ``release()`` gives its holds back, so that the last
  holder still unlinks the segment and the last router user still evicts what routers kept warm.
  (A SIGKILLed process cannot; the kernel drops its locks and ``modelshare gc`` does the rest.)

Everything that needs either is in this module's table; nothing else in modelshare calls
``os.register_at_fork`` or ``atexit``. The table has two parts:

* models (:func:`model_entry`): one entry per model this process holds, met by every thread and
  every unpickled copy of the same ``SharedModel``: a lock, a refcount, and the mode's hold;
* resources (:func:`track`): what lives apart from a model's entry -- a released segment that a
  live array still maps, a GPU copy that tensors still use, a directory's router membership.

Instances handed out by ``SharedModel.instance()`` are released when they become garbage
(:func:`when_collected`). A weak reference's callback runs wherever the collector happens to run --
inside any lock of this process, this module's included -- so it only queues the instance, and a
thread of this module's (the reaper, started on first use, anew in a forked child) releases it.

At exit, models are released first, then resources by ``exit_stage``: what a release leaves
behind (stage 1) goes before what needs everything else gone (stage 2: the last router user's
eviction).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import os
import queue
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, TypeVar

if TYPE_CHECKING:
    from ._modes import Hold

__all__ = ["Resource", "ModelEntry", "model_entry", "track", "untrack", "tracked", "sweep_once", "when_collected",
           "after", "settle"]


class Resource:
    """Something this process holds that a fork or the exit must deal with (see the module docstring)."""

    exit_stage: ClassVar[int] = 1

    def before_fork(self) -> None:
        """In the parent, just before a fork: prepare what the child takes over (a lock of its own)."""

    def fork_done(self) -> None:
        """After the fork, where the preparation is not taken over: in the parent, and in a child
        that no longer holds this resource (released by another thread meanwhile)."""

    def after_fork_in_child(self) -> None:
        """In a forked child, right after the fork: take what is needed anew, or forget the parent's
        without disturbing it (never close a lock or shut a socket the parent still uses)."""

    def release_at_exit(self) -> None:
        """At exit: give back what release() would have."""


R = TypeVar("R", bound=Resource)


class ModelEntry:
    """One model in this process: the lock its acquires and releases take, how many acquires,
    the instances handed out (by ``id``: a reference that gives the instance back while it lives),
    and the mode's hold (``_modes.Hold``, itself a :class:`Resource`), or None when not held --
    kept a while after the last release while ``lingering``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refcount = 0
        self.instances: dict[int, Callable[[], Any]] = {}
        self.held: "Optional[Hold]" = None
        self.lingering: Optional[object] = None  # the token of the linger under way, if the hold is lingering

    @property
    def in_use(self) -> bool:
        """Whether anything handed out for this model is still held."""
        return bool(self.refcount or self.instances)


class _Table:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[tuple[str, ...], ModelEntry] = {}
        self.resources: dict[int, Resource] = {}
        self.weak_resources: "weakref.WeakSet[Resource]" = weakref.WeakSet()
        self.swept: set[Path] = set()
        self.exited_pid = 0
        self.timers: list[tuple[float, int, Callable[[], None]]] = []  # a heap: (when, order, callback)
        self.timer_ids = itertools.count()


_table = _Table()


def model_entry(ident: tuple[str, ...]) -> ModelEntry:
    """The entry for the model named ``ident`` (made on first use; entries are never removed)."""
    with _table.lock:
        entry = _table.models.get(ident)
        if entry is None:
            entry = _table.models[ident] = ModelEntry()
        return entry


def track(resource: Resource, *, weak: bool = False) -> None:
    """Count ``resource`` among this process's holds until :func:`untrack`. ``weak``: only while
    something else keeps it alive (a GPU copy lives as long as the tensors built on it)."""
    with _table.lock:
        if weak:
            _table.weak_resources.add(resource)
        else:
            _table.resources[id(resource)] = resource


def untrack(resource: Resource) -> None:
    with _table.lock:
        _table.resources.pop(id(resource), None)
        _table.weak_resources.discard(resource)


def tracked(kind: type[R]) -> list[R]:
    """The resources of type ``kind`` this process holds now."""
    with _table.lock:
        return [r for r in [*_table.resources.values(), *_table.weak_resources] if isinstance(r, kind)]


def sweep_once(directory: Path, sweep: Callable[[Path], object]) -> None:
    """Run ``sweep(directory)`` the first time this process uses ``directory`` (collecting what
    crashed processes left before taking more memory there)."""
    with _table.lock:
        first = directory not in _table.swept
        _table.swept.add(directory)
    if first:
        sweep(directory)


class _Reaper:
    """The thread that runs :func:`when_collected` callbacks, outside the collector, and
    :func:`after` callbacks once their time comes (the timers live in ``_table``: a forked
    child's new reaper runs the ones it inherited)."""

    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[tuple[Callable[[weakref.ref[Any]], None], weakref.ref[Any]]]" = \
            queue.SimpleQueue()  # put() is safe inside a weakref callback, by design
        self.thread = threading.Thread(target=self._run, name="modelshare-reaper", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            due = []
            with _table.lock:
                while _table.timers and _table.timers[0][0] <= time.monotonic():
                    due.append(heapq.heappop(_table.timers))
                wait = _table.timers[0][0] - time.monotonic() if _table.timers else None
            for _, _, callback in due:
                _quietly(callback)  # nothing to raise to: a timer of this process's own
            try:
                callback, ref = self.queue.get(timeout=None if wait is None else max(wait, 0.0))
            except queue.Empty:
                continue
            _quietly(lambda: callback(ref))  # nothing to raise to: the instance was garbage


_reaper: Optional[_Reaper] = None


def _the_reaper() -> _Reaper:
    """The reaper thread, started on first use (call with ``_table.lock`` held)."""
    global _reaper
    if _reaper is None:
        _reaper = _Reaper()
    return _reaper


def when_collected(obj: object, callback: "Callable[[weakref.ref[Any]], None]") -> "weakref.ref[Any]":
    """A weak reference to ``obj``; once ``obj`` is garbage, ``callback(ref)`` runs in the reaper
    thread. TypeError where ``obj`` cannot be weakly referenced."""
    with _table.lock:
        _the_reaper()
    return weakref.ref(obj, lambda ref: _reaper.queue.put((callback, ref)) if _reaper is not None else None)


def after(seconds: float, callback: Callable[[], None]) -> None:
    """Run ``callback()`` in the reaper thread ``seconds`` from now (a lingering hold's end)."""
    with _table.lock:
        heapq.heappush(_table.timers, (time.monotonic() + seconds, next(_table.timer_ids), callback))
        reaper = _the_reaper()
    reaper.queue.put((lambda _: None, weakref.ref(reaper)))  # wake it: this timer may be the next one


def settle(timeout: float = 30.0) -> bool:
    """Wait until instances already collected are released (the reaper runs callbacks in order).
    Whether that happened within ``timeout``."""
    reaper = _reaper
    if reaper is None:
        return True
    done = threading.Event()
    reaper.queue.put((lambda _: done.set(), weakref.ref(done)))
    return done.wait(timeout)


def _resources() -> list[Resource]:
    with _table.lock:
        return sorted([*_table.resources.values(), *_table.weak_resources], key=lambda r: r.exit_stage)


def _holds() -> list[Resource]:
    """Every model's hold and every resource, held now."""
    with _table.lock:
        held: list[Resource] = [entry.held for entry in _table.models.values() if entry.held is not None]
    return held + _resources()


_prepared: list[Resource] = []  # what before_fork prepared, for the fork under way


def _before_fork() -> None:
    _hook_multiprocessing()
    _prepared[:] = _holds()
    for resource in _prepared:
        _quietly(resource.before_fork)


def _after_fork_in_parent() -> None:
    for resource in _prepared:
        _quietly(resource.fork_done)
    _prepared.clear()


def _after_fork_in_child() -> None:
    """In the child: every lock anew (a thread of the parent may have held one), then each
    model's hold and each resource deals with the fork."""
    global _reaper
    _table.lock = threading.Lock()
    _table.exited_pid = 0
    if _reaper is not None:  # the parent's thread is not here, and its queue may be mid-put
        _reaper = _Reaper()
    for entry in _table.models.values():
        entry.lock = threading.Lock()
    held = _holds()
    for resource in _prepared:
        if not any(resource is h for h in held):
            _quietly(resource.fork_done)
    _prepared.clear()
    for resource in held:
        _quietly(resource.after_fork_in_child)


def _release_all_at_exit() -> None:
    """The exit hook (runs once per process): models first, then resources by stage."""
    if _table.exited_pid == os.getpid():
        return
    _table.exited_pid = os.getpid()
    with _table.lock:
        entries = list(_table.models.values())
    for entry in entries:
        held, entry.held, entry.refcount = entry.held, None, 0
        entry.instances.clear()
        if held is not None:
            _quietly(held.release_at_exit)
    for resource in _resources():
        _quietly(resource.release_at_exit)


def _quietly(step: Callable[[], None]) -> None:
    """Run one resource's part of a fork or the exit: its failure must not stop the others'
    (nothing can be raised to a caller there; a prepared lock that failed is taken in the child)."""
    try:
        step()
    except Exception:  # noqa: BLE001
        pass


def _hook_exit_of_multiprocessing_child(_: object = None) -> None:
    # A child that multiprocessing forks leaves through os._exit, skipping atexit; it runs the
    # finalizers registered after its start instead (it clears those inherited from the parent).
    import multiprocessing.util

    multiprocessing.util.Finalize(None, _release_all_at_exit, exitpriority=10)


_multiprocessing_hooked = False


def _hook_multiprocessing() -> None:
    """Once multiprocessing is imported here (now, or before a fork): its children release at exit.
    Not imported for it: ~1.7 MiB, with what it pulls in, in every process that imports modelshare;
    a process that multiprocessing starts or forks has imported it by then."""
    global _multiprocessing_hooked
    if _multiprocessing_hooked or "multiprocessing.util" not in sys.modules:
        return
    _multiprocessing_hooked = True
    _hook_exit_of_multiprocessing_child()
    sys.modules["multiprocessing.util"].register_after_fork(_table, _hook_exit_of_multiprocessing_child)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
atexit.register(_release_all_at_exit)
_hook_multiprocessing()
