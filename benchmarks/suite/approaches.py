"""The ways a worker process can get its model: the usual ones, Beam's own, and modelshare's.

Each approach is a function that a worker *thread* calls once: it returns ``infer(call_index, x)``
and the thread runs every call through it. Beam's mechanisms are Beam's real classes, used the
way RunInference uses them:

* ``private-per-thread``: every thread loads the file itself (a thread pool with no sharing);
* ``beam-shared``: ``apache_beam.utils.shared.Shared`` -- Beam's default: one model per process,
  shared by its threads; across processes, a private copy each;
* ``beam-multi-process-shared``: ``MultiProcessShared(..., always_proxy=True)`` as
  ``large_model=True`` uses it: one model in a server process, every call pickled to it and back
  over a local socket;
* ``modelshare``: ``SharedModel(share="processes")`` -- one copy of the weights per machine, every
  process computing locally on zero-copy views, with the cores shared out among the processes
  (``modelshare.threads.ThreadShare``, as the Beam adapter does by default);
* ``modelshare-threads``: ``SharedModel(share="threads")`` -- one copy per process;
* ``modelshare-mapped``: ``share=Processes(map_files=True)`` -- as ``modelshare``, but the weights
  the lean load mapped stay in the saved file (a file-backed segment): the page cache is the one
  copy, as for ``mmap-file``, with modelshare's load-once, lifetime and budget;
* ``mmap-file``: the peer where it applies -- every process maps the saved file itself
  (``torch.load(mmap=True)``, ``joblib.load(mmap_mode="r")``, an ONNX Runtime session over
  external data with prepacking off): the page cache is the one copy,
  charged to the cgroup that first reads it (the suite evicts the file first), reclaimable under
  the limit and read again from disk when needed; its processes share the cores out as
  modelshare's do (cores / processes threads each);
* ``ray-object-store``: Ray's zero-copy pattern (``ray_peer``) -- a detached actor puts the state
  dict in Ray's object store once, every worker process gets it as read-only views and assigns
  them to the module (PyTorch only; needs ``ray``: the ``peers`` extra); the cores shared out
  as for ``mmap-file``;
* ``beam-model-copies``: ``model_copies=N`` -- N ``MultiProcessShared`` servers (tags
  ``<key>_<i>``, each a thread of the worker that first asked for it), calls round robin;
* ``modelshare-server``: ``SharedModel(share=Server(copies=N))`` -- N server processes, each
  call to the least busy;
* ``beam-keyed-hint``: several keyed models through Beam's ``KeyedModelHandler`` with
  ``max_models_per_worker_hint`` -- a count of models per worker process;
* ``modelshare-router``: the same keys through ``ModelRouter`` under a machine-wide byte budget.

Keyed approaches pick the key of each call from the call's index, so every approach sees the
same key sequence.

A scenario module names which of these it runs; scenario 2 (keyed models under a budget) and 4
(exact copies) add theirs here, behind the same signature.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..frameworks import FRAMEWORKS

Infer = Callable[[int, Any], Any]


@dataclass(frozen=True)
class RunSpec:
    """What every worker of one run is told (it travels as JSON)."""

    framework: str
    model_path: str
    approach: str
    threads: int
    calls: int
    key: str  # the model's name: modelshare's segment key, Beam's shared tag
    run_dir: str  # per-run scratch: Beam's lock and address files, the workers' results
    segment_dir: str  # modelshare's segment directory for this run
    launched_at: float  # wall-clock time the suite started the workers
    copies: int = 1  # model instances on the machine, for the approaches with exact copies
    keyed_models: int = 1  # keyed approaches: how many models (files <model_path>.k<i>)
    held_models: int = 1  # keyed approaches: Beam's per-worker hint; the router's budget in models
    budget_bytes: int = 0  # the router's host budget
    processes: int = 1  # worker processes in the run


_process_models: dict[str, Any] = {}  # what one process holds for its threads, per approach
STATS: list[Callable[[], dict[str, int]]] = []  # counters an approach reports when the worker is done
_process_lock = threading.Lock()


def _once_per_process(name: str, make: Callable[[], Any]) -> Any:
    with _process_lock:
        if name not in _process_models:
            _process_models[name] = make()
        return _process_models[name]


class _Held:
    """Beam's ``Shared`` keeps weak references: the model goes in an object that can have one."""

    def __init__(self, model: Any) -> None:
        self.model = model


def private_per_thread(spec: RunSpec) -> Infer:
    framework = FRAMEWORKS[spec.framework]
    model = framework.load(Path(spec.model_path))
    return lambda _, x: framework.call(model, x)


def beam_shared(spec: RunSpec) -> Infer:
    from apache_beam.utils.shared import Shared

    framework = FRAMEWORKS[spec.framework]
    handle = _once_per_process("beam-shared-handle", Shared)
    held = handle.acquire(lambda: _Held(framework.load(Path(spec.model_path))), tag=spec.key)
    return lambda _, x: framework.call(held.model, x)


def beam_multi_process_shared(spec: RunSpec) -> Infer:
    from apache_beam.utils.multi_process_shared import MultiProcessShared

    framework = FRAMEWORKS[spec.framework]
    proxy = MultiProcessShared(functools.partial(framework.load, Path(spec.model_path)), tag=spec.key,
                               path=spec.run_dir, always_proxy=True).acquire()
    return lambda _, x: framework.call(proxy, x)


def _modelshare(share: str, spec: RunSpec) -> Infer:
    from modelshare.threads import ThreadShare  # here: a peer's worker never imports modelshare

    framework = FRAMEWORKS[spec.framework]

    shared = _once_per_process(f"modelshare-{share}", lambda: framework.shared(
        Path(spec.model_path), key=spec.key, directory=Path(spec.segment_dir), share=share))
    model = shared.acquire()  # every thread acquires: the first loads or attaches, the others wait for it
    if share == "threads":
        return lambda _, x: framework.call(model, x)
    threads = _once_per_process("modelshare-thread-share", lambda: ThreadShare("auto", recheck_seconds=1.0))

    def infer(_: int, x: Any) -> Any:
        threads.apply(shared)
        return framework.call(model, x)

    return infer


def mmap_file(spec: RunSpec) -> Infer:
    framework = FRAMEWORKS[spec.framework]
    if framework.lean_load is None:
        raise ValueError(f"{spec.framework} models have no memory-mapped load: the mmap-file peer does not apply")
    model = _once_per_process("mmap-file", lambda: framework.lean_load(Path(spec.model_path)))
    return _cores_shared_out(spec, model)


def _cores_shared_out(spec: RunSpec, model: Any) -> Infer:
    """Calls on ``model`` with this process's share of the cores (cores / processes threads): a peer
    shares them out as modelshare does, so that the two differ in memory, not in threads."""
    framework = FRAMEWORKS[spec.framework]
    _once_per_process("peer-thread-share", lambda: _share_cores(max(1, (os.cpu_count() or 1) // spec.processes)))
    return lambda _, x: framework.call(model, x)


def _share_cores(threads: int) -> None:
    """What ``ThreadShare`` sets (PyTorch's intra-op pool, the BLAS pools), without importing
    modelshare: a peer's process pays for nothing of ours, its memory included."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=threads)


def ray_object_store(spec: RunSpec) -> Infer:
    from . import ray_peer

    framework = FRAMEWORKS[spec.framework]
    if spec.framework != "torch":
        raise ValueError(f"the Ray peer rebuilds PyTorch modules only, not {spec.framework} models")

    def connect_and_get() -> Any:
        ray_peer.connect(Path(spec.run_dir), Path(spec.model_path).stat().st_size)
        return ray_peer.shared_module(spec.key, framework.load, Path(spec.model_path))

    return _cores_shared_out(spec, _once_per_process("ray-object-store", connect_and_get))


def why_not(approach: str, framework: str) -> Optional[str]:
    """Why ``approach`` cannot run ``framework``'s models here, or None if it can (the mapped ones
    need a mapped load; Ray's, PyTorch and Ray)."""
    if approach == "ray-object-store":
        from .ray_peer import available

        if framework != "torch":
            return "it rebuilds PyTorch modules only"
        return None if available() else "ray is not installed (pip install 'modelshare[peers]')"
    if approach in ("mmap-file", "modelshare-mapped") and FRAMEWORKS[framework].lean_load is None:
        return f"{framework} models have no memory-mapped load"
    return None


def beam_model_copies(spec: RunSpec) -> Infer:
    from apache_beam.utils.multi_process_shared import MultiProcessShared

    framework = FRAMEWORKS[spec.framework]
    load = functools.partial(framework.load, Path(spec.model_path))
    proxies = [MultiProcessShared(load, tag=f"{spec.key}_{i}", path=spec.run_dir, always_proxy=True).acquire()
               for i in range(spec.copies)]
    turn = itertools.count()
    return lambda _, x: framework.call(proxies[next(turn) % len(proxies)], x)


def modelshare_server(spec: RunSpec) -> Infer:
    from modelshare import Server, SharedModel

    framework = FRAMEWORKS[spec.framework]
    shared = _once_per_process("modelshare-server", lambda: SharedModel(
        functools.partial(framework.load, Path(spec.model_path)), key=spec.key, share=Server(copies=spec.copies),
        directory=spec.segment_dir, version=spec.model_path))
    model = shared.acquire()
    return lambda _, x: framework.call(model, x)


def keyed_paths(spec: RunSpec) -> list[str]:
    return [f"{spec.model_path}.k{i}" for i in range(spec.keyed_models)]


def key_of_call(spec: RunSpec, call_index: int) -> int:
    """Which keyed model call ``call_index`` uses: the same sequence for every approach."""
    return random.Random(call_index).randrange(spec.keyed_models)


def beam_keyed_hint(spec: RunSpec) -> Infer:
    from . import beam_keyed

    def make() -> Any:
        STATS.append(lambda: dict(beam_keyed.LOADS))
        return beam_keyed.keyed_handler(spec.framework, keyed_paths(spec), spec.held_models)

    handler = _once_per_process("beam-keyed", make)
    manager = _once_per_process("beam-keyed-manager", handler.load_model)
    lock = _once_per_process("beam-keyed-lock", threading.Lock)  # Beam runs one bundle per DoFn at a time

    def infer(call_index: int, x: Any) -> Any:
        with lock:
            ((_, out),) = handler.run_inference([(f"k{key_of_call(spec, call_index)}", x)], manager)
        return out

    return infer


def modelshare_router(spec: RunSpec) -> Infer:
    from modelshare import Budget, ModelRouter, SharedModel

    framework = FRAMEWORKS[spec.framework]

    def make() -> ModelRouter:
        models = {f"k{i}": SharedModel(functools.partial(framework.lean_load or framework.load, Path(p)), key=f"k{i}",
                                       directory=spec.segment_dir, version=p) for i, p in enumerate(keyed_paths(spec))}
        router = ModelRouter(models, budget=Budget(host=spec.budget_bytes), wait=600,
                             load_overhead=1.0 if framework.lean_load else None)  # a mapped load: no private copy
        STATS.append(lambda: {f"machine_{k}": v for k, v in _router_totals(router).items()})
        return router

    router = _once_per_process("modelshare-router", make)

    def infer(call_index: int, x: Any) -> Any:
        shared, model = router.acquire(f"k{key_of_call(spec, call_index)}")
        try:
            return framework.call(model, x)
        finally:
            shared.release(model)
            del model  # nothing refers to it after the call: once evicted, its memory goes

    return infer


def _router_totals(router: Any) -> dict[str, int]:
    stats = router.stats().values()
    return {"loads": sum(s.loads for s in stats), "hits": sum(s.hits for s in stats),
            "evictions": sum(s.evictions for s in stats)}


APPROACHES: dict[str, Callable[[RunSpec], Infer]] = {
    "private-per-thread": private_per_thread,
    "beam-shared": beam_shared,
    "beam-multi-process-shared": beam_multi_process_shared,
    "modelshare": functools.partial(_modelshare, "processes"),
    "modelshare-threads": functools.partial(_modelshare, "threads"),
    "modelshare-mapped": functools.partial(_modelshare, "mapped"),
    "mmap-file": mmap_file,
    "ray-object-store": ray_object_store,
    "beam-model-copies": beam_model_copies,
    "modelshare-server": modelshare_server,
    "beam-keyed-hint": beam_keyed_hint,
    "modelshare-router": modelshare_router,
}

LABELS: dict[str, str] = {
    "private-per-thread": "a private load per thread",
    "beam-shared": "Beam's default (`Shared`: one per process)",
    "beam-multi-process-shared": "Beam's `large_model=True` (`MultiProcessShared`)",
    "modelshare": "modelshare (`share=\"processes\"`)",
    "modelshare-threads": "modelshare (`share=\"threads\"`)",
    "modelshare-mapped": "modelshare, weights left in the file (`Processes(map_files=True)`)",
    "mmap-file": ("the file memory-mapped in every process (`torch.load(mmap=True)`, safetensors, joblib `mmap_mode`, "
                  "ORT external data)"),
    "ray-object-store": "Ray's object store (`ray.put` state dict, rebuilt in each process)",
    "beam-model-copies": "Beam's `model_copies=N` (N `MultiProcessShared`)",
    "modelshare-server": "modelshare (`share=Server(copies=N)`)",
    "beam-keyed-hint": "Beam's `KeyedModelHandler(max_models_per_worker_hint=N)`",
    "modelshare-router": "modelshare `ModelRouter` (a byte budget for N models)",
}
