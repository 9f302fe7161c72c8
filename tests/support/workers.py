"""Models, loaders and process entry points for the tests (importable by spawned children)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from benchmarks.models import MiB, NumpyMLP, numpy_mlp, sample_input  # noqa: F401


def make_mlp(total_mib: int, width: int = 4096, seed: int = 0, counter: Optional[str] = None,
             delay: float = 0.0) -> NumpyMLP:
    """``numpy_mlp``, appending this pid to the file ``counter`` first so tests can count loads."""
    if counter:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
    if delay:
        time.sleep(delay)
    return numpy_mlp(total_mib, width, seed)


def loads_counted(counter: str) -> list[int]:
    path = Path(counter)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def bare_worker(ready: Any, done: Any) -> None:
    """A process that imported modelshare and nothing else: the baseline of the PSS budget."""
    import modelshare  # noqa: F401

    ready.put(os.getpid())
    done.wait()


def use_worker(shared: Any, x: np.ndarray, results: Any, done: Any, threads: int = 1) -> None:
    """Acquire ``shared`` (from ``threads`` racing threads), report outputs, hold until ``done``."""
    import threading

    outputs: list[Any] = [None] * threads
    models: list[Any] = [None] * threads
    start = threading.Barrier(threads)

    def run(i: int) -> None:
        start.wait()
        models[i] = shared.acquire()
        outputs[i] = models[i](x)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    same = all(m is models[0] for m in models)
    results.put((os.getpid(), outputs[0], same))
    done.wait()
    for m in models:
        shared.release(m)


def hold_forever(shared: Any, x: np.ndarray, results: Any) -> None:
    """Acquire and compute in a loop until killed."""
    model = shared.acquire()
    results.put((os.getpid(), model(x), True))
    while True:
        model(x)


def acquire_and_exit(shared: Any, results: Any) -> None:
    """Acquire and leave without release(): the exit hook must release."""
    model = shared.acquire()
    results.put(os.getpid())
    del model


def bare_framework_worker(framework: str, ready: Any, done: Any) -> None:
    """A process that imported modelshare and ``framework``: the PSS baseline for that framework."""
    import importlib

    import modelshare  # noqa: F401

    importlib.import_module(framework)
    ready.put(os.getpid())
    done.wait()


def torch_use_worker(shared: Any, x: Any, results: Any, done: Any) -> None:
    """Acquire a shared torch module, run it under inference_mode, hold until ``done``."""
    import torch

    model = shared.acquire()
    with torch.inference_mode():
        out = model(x)
    results.put((os.getpid(), out, True))
    done.wait()
    shared.release(model)


def torch_write_worker(shared: Any, results: Any) -> None:
    """Write into a shared weight (copy-on-write) and report what this process now sees."""
    import torch

    model = shared.acquire()
    with torch.no_grad():
        first = next(model.parameters())
        first.fill_(7.0)
    results.put((os.getpid(), float(first.flatten()[0])))
    shared.release(model)


def onnx_use_worker(shared: Any, x: Any, results: Any, done: Any) -> None:
    """Acquire a shared ONNX Runtime session, run it, hold until ``done``."""
    session = shared.acquire()
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    results.put((os.getpid(), out, True))
    done.wait()
    shared.release(session)


def sklearn_use_worker(shared: Any, x: Any, results: Any, done: Any) -> None:
    """Acquire a shared scikit-learn estimator, predict probabilities, hold until ``done``."""
    model = shared.acquire()
    results.put((os.getpid(), model.predict_proba(x), True))
    done.wait()
    shared.release(model)


def describe_plan(plan: memoryview) -> dict:
    """Stands in for TensorRT's deserializer: reports what it was handed (a view, its bytes)."""
    import numpy as np

    return {"nbytes": plan.nbytes, "readonly": plan.readonly, "head": bytes(plan[:16]),
            "address": np.frombuffer(plan, dtype=np.uint8).ctypes.data, "pid": os.getpid()}


def tensorrt_plan_worker(shared: Any, x: Any, results: Any, done: Any) -> None:
    """Acquire a shared plan through a deserializer stand-in, check it is a view of the segment."""
    from modelshare import memory

    engine = shared.acquire()
    maps = open(f"/proc/{os.getpid()}/maps").read().splitlines()
    inside = any(int(lo, 16) <= engine["address"] < int(hi, 16) and str(shared.segment_name.seg_path) in line
                 for line in maps for lo, hi in [line.split()[0].split("-")])
    results.put((os.getpid(), dict(engine, in_segment=inside, segment_pss=memory.process().segment_pss), True))
    done.wait()
    shared.release(engine)


class Unsplittable:
    """A model no codec can split into weights: it holds a lock and an open file (a native handle)."""

    def __init__(self, width: int = 64, counter: Optional[str] = None, delay: float = 0.0) -> None:
        if counter:
            with open(counter, "a") as f:
                f.write(f"{os.getpid()}\n")
        self.lock = threading.Lock()
        self.handle = open(os.devnull, "rb")
        self.weights = np.arange(width * width, dtype=np.float32).reshape(width, width) / (width * width)
        self.delay = delay
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        with self.lock:
            time.sleep(self.delay)
            return x @ self.weights

    def whoami(self) -> int:
        time.sleep(self.delay)
        return os.getpid()

    def boom(self) -> None:
        raise ValueError("raised inside the model")

    def slow(self, x: Any, seconds: float) -> Any:
        """``x`` back after ``seconds``: a call long enough to interrupt."""
        self.calls += 1
        time.sleep(seconds)
        return x

    def blob(self, nbytes: int) -> bytes:
        """``nbytes`` of a pattern, as one ``bytes`` object (in-band, not an array)."""
        return (b"0123456789abcdef" * (nbytes // 16 + 1))[:nbytes]

    def seen(self) -> int:
        """How many calls of ``slow`` and ``__call__`` this instance has started."""
        return self.calls


def noisy_model(stdout_bytes: int, stderr_bytes: int) -> Unsplittable:
    """A loader that prints (to stdout and stderr) before returning the model."""
    import sys

    print("loading the model" + "." * stdout_bytes, flush=True)
    sys.stderr.write("warming up" + "!" * stderr_bytes + "\n")
    sys.stderr.flush()
    return Unsplittable()


def slow_model(seconds: float, counter: Optional[str] = None) -> Unsplittable:
    """A loader that takes ``seconds`` (its pid appended to ``counter`` first)."""
    model = Unsplittable(counter=counter)
    time.sleep(seconds)
    return model


def _refuse_to_load() -> Any:
    raise ImportError("this object cannot be rebuilt where it is unpickled")


class Unloadable:
    """Pickles fine; unpickling it fails (as an object of a module the server lacks would)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


def server_calls_worker(shared: Any, x: np.ndarray, calls: int, results: Any) -> None:
    """Call a server-shared model ``calls`` times; report outputs and which servers answered."""
    model = shared.acquire()
    outputs, servers = [], []
    for _ in range(calls):
        outputs.append(model(x))
        servers.append(model.whoami())
    shared.release(model)
    results.put((os.getpid(), outputs[0], sorted(set(servers)), all(np.array_equal(o, outputs[0]) for o in outputs)))


class NotThreadSafe:
    """A model that fails if two threads call it at once (it keeps per-call state)."""

    def __init__(self, width: int = 256) -> None:
        self.weights = np.ones((width, width), dtype=np.float32)
        self.busy = False

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.busy:
            raise RuntimeError("called from two threads at once")
        self.busy = True
        try:
            time.sleep(0.01)
            return x @ self.weights
        finally:
            self.busy = False


class OnDevice:
    """A model that remembers the device its server put it on."""

    def __init__(self, device: str) -> None:
        self.device = device

    def where(self) -> tuple[str, str, int]:
        return self.device, os.environ.get("MODELSHARE_DEVICE", ""), os.getpid()


def blob(mib: int, seed: int = 0) -> dict:
    """A model that is just ``mib`` MiB of weights (the router tests' unit of memory)."""
    return {"w": np.full(mib * MiB, seed % 251, dtype=np.uint8), "seed": seed}


def counted_blob(counter: str, mib: int, seed: int = 0) -> dict:
    """``blob``, appending this pid to the file ``counter`` first (to count loads)."""
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    return blob(mib, seed)


def slow_blob(mib: int, seed: int = 0) -> dict:
    """``blob``, built the way real loaders build models: privately, over some time."""
    model = blob(mib, seed)
    time.sleep(0.1)
    return model


def route_worker(directory: str, budget: int, keys: list[str], mib: int, rounds: int, seed: int, results: Any) -> None:
    """Use the router's models in a random order; report (uses, errors)."""
    import functools
    import random

    from modelshare import Budget, ModelRouter, SharedModel

    router = ModelRouter({k: SharedModel(functools.partial(blob, mib, i), key=k, directory=directory)
                          for i, k in enumerate(keys)}, budget=Budget(host=budget), load_overhead=1)
    rng = random.Random(seed)
    errors = []
    for _ in range(rounds):
        key = rng.choice(keys)
        try:
            with router.use(key) as model:
                if model["seed"] != keys.index(key) or model["w"][0] != keys.index(key) % 251:
                    errors.append(f"{key}: wrong model")
                time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001 -- reported to the test
            errors.append(f"{key}: {type(exc).__name__}: {exc}")
    stats = router.stats().values()  # machine-wide, before this process (maybe the last user) leaves
    results.put((os.getpid(), rounds, errors, sum(s.loads + s.hits for s in stats),
                 sum(s.evictions for s in stats)))


def hold_routed_and_wait(directory: str, budget: int, keys: list[str], mib: int, results: Any) -> None:
    """Hold every key's model through the router until killed."""
    import functools

    from modelshare import Budget, ModelRouter, SharedModel

    router = ModelRouter({k: SharedModel(functools.partial(blob, mib, i), key=k, directory=directory)
                          for i, k in enumerate(keys)}, budget=Budget(host=budget), load_overhead=1)
    held = [router.acquire(k) for k in keys]
    results.put(os.getpid())
    time.sleep(3600)
    assert held


FAKE_GPU = "0123456789abcdef0123456789abcdef"  # the UUID a copy in the keeper tests claims to live on


def memfd_with(nbytes: int, pattern: bytes) -> int:
    """A memfd of ``nbytes`` filled with ``pattern``: what an exported GPU copy is to its keeper."""
    fd = os.memfd_create("modelshare-test-copy")
    os.ftruncate(fd, nbytes)
    os.pwrite(fd, (pattern * (nbytes // len(pattern) + 1))[:nbytes], 0)
    return fd


def make_copy_and_hold(directory: str, stem: str, nbytes: int, pattern: bytes, results: Any, done: Any) -> None:
    """Make a 'GPU copy' (a memfd), start its keeper, hold it until ``done``: the loader's part."""
    from modelshare._gpu.keeper import DeviceCopyFiles, start_keeper
    from modelshare._host.directory import SegmentName

    files = DeviceCopyFiles(SegmentName(Path(directory), stem), FAKE_GPU)
    fd = memfd_with(nbytes, pattern)
    with files.starting():
        lease = start_keeper(files, fd, nbytes=nbytes, fingerprint="f" * 64, read_only=True, key=stem)
    os.close(fd)
    results.put(("made", os.getpid()))
    done.wait()
    lease.close()


def map_copy_and_check(directory: str, stem: str, pattern: bytes, results: Any, check: Any, done: Any) -> None:
    """Take the keeper's descriptor, map it, and report whether it holds ``pattern`` each time
    ``check`` is set, until ``done``: a process computing on the copy."""
    import mmap

    from modelshare._gpu.keeper import DeviceCopyFiles, request_copy
    from modelshare._host.directory import SegmentName

    found = request_copy(DeviceCopyFiles(SegmentName(Path(directory), stem), FAKE_GPU))
    if found is None:
        results.put(("none", os.getpid()))
        return
    lease, about, fd = found
    view = mmap.mmap(fd, about["nbytes"], prot=mmap.PROT_READ)
    os.close(fd)
    expected = (pattern * (about["nbytes"] // len(pattern) + 1))[: about["nbytes"]]
    results.put(("mapped", os.getpid(), view[:] == expected))
    while not done.is_set():
        if check.wait(0.05):
            check.clear()
            results.put(("checked", os.getpid(), view[:] == expected))
    view.close()
    lease.close()


def drop_lingering_holds(results: Any) -> None:
    """In a forked child: give up every released-but-still-mapped hold inherited from the parent."""
    from modelshare._host.holds import lingering_holds

    results.put([hold.drop() for hold in lingering_holds()])


def publish_and_measure(shared: Any, results: Any) -> None:
    """Acquire ``shared`` (this process loads and publishes it); report the peak of this process's
    anonymous memory over the acquire, in bytes (what loading cost beside the segment)."""
    from modelshare.memory import Peak, anonymous_bytes

    start = anonymous_bytes()
    with Peak(anonymous_bytes, every=0.002) as peak:
        model = shared.acquire()
    info = shared.hold_info()
    results.put((max(0, peak.value - start), bool(info and info.loaded_here)))
    shared.release(model)


class Stateful:
    """A model with state: each call counts, and the count is part of the answer (as a stateful
    Beam model's would be)."""

    def __init__(self, mib: int = 1) -> None:
        self.weights = np.ones(mib * MiB // 4, dtype=np.float32)
        self.calls = 0

    def __call__(self, x: float) -> float:
        self.calls += 1
        return float(self.weights[0]) * x + self.calls


def stateful(mib: int = 1) -> Stateful:
    return Stateful(mib)


def instances_worker(shared: Any, x: Any, results: Any, done: Any) -> None:
    """Take three instances of ``shared``; report their first answers; hold them until ``done``."""
    models = [shared.instance() for _ in range(3)]
    results.put((os.getpid(), [m(x) for m in models], True))
    done.wait()
    for m in models:
        shared.release(m)


def weights_from_file(path: str, counter: str) -> dict:
    """A generic loader that reads its weights from a ``.npy`` file (counting loads in ``counter``)."""
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"w": np.load(path)}


def first_weight_in_new_process(path: str, counter: str, directory: str, queue: Any) -> None:
    """A process started after the file changed: which weights it gets (the new ones)."""
    import functools

    from modelshare import SharedModel

    shared = SharedModel(functools.partial(weights_from_file, path, counter), key="watched",
                         watch=[path], directory=directory)
    with shared.use() as model:
        queue.put(int(model["w"][0]))


def torch_layers(width: int, depth: int) -> Any:
    """A stack of ``depth`` square linear layers (the model class of file-backed tests)."""
    import torch

    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def attach_error(shared: Any, queue: Any) -> None:
    """Acquire ``shared`` in a new process; report the error it raised (or None and the first weight)."""
    try:
        with shared.use() as model:
            queue.put((None, float(next(model.parameters()).flatten()[0])))
    except Exception as exc:  # the test asserts on its type and words
        queue.put((type(exc).__name__, str(exc)))
