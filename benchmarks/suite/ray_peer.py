"""The Ray peer: the weights in Ray's object store, the module rebuilt over them in every worker.

Ray's zero-copy pattern for one model in many processes: numpy arrays put in the object store
come back from ``ray.get`` as read-only views of its shared memory (plasma, in ``/dev/shm``), so
every process that gets them maps one copy. The first worker of a run starts a Ray head (its
daemons and the actor below run in the run's memory cgroup, as any worker: the suite charges
Ray for them); a detached named actor loads the model once, puts its state dict in the object
store and keeps the reference; every worker connects as a driver, gets the arrays and assigns
them to the module's skeleton (``load_state_dict(assign=True)``). The head stops when the worker
that started it exits (and with the cgroup, in any case).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

HEAD_START_TIMEOUT = 180.0


def available() -> bool:
    """Whether Ray can be imported here (the optional ``peers`` extra)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _start_head(temp: Path, object_store_bytes: int) -> None:
    """Start a Ray head whose files live in ``temp``; it is stopped when this process exits."""
    temp.mkdir(parents=True, exist_ok=True)
    log = open(temp.parent / "ray-head.log", "wb")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port=0",
         f"--num-cpus={os.cpu_count() or 1}", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}", f"--object-store-memory={object_store_bytes}"],
        stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        head.terminate()
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()

    atexit.register(stop)
    deadline = time.monotonic() + HEAD_START_TIMEOUT
    while not (temp / "ray_current_cluster").exists():
        if head.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head did not start (see {temp.parent / 'ray-head.log'})")
        time.sleep(0.2)


def connect(run_dir: Path, model_bytes: int) -> None:
    """Connect this process to the run's Ray cluster, starting it if no worker has."""
    import ray

    temp = run_dir / "ray"
    with open(run_dir / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (temp / "ray_current_cluster").exists():
            _start_head(temp, max(2 * model_bytes, 256 << 20))
    address = (temp / "ray_current_cluster").read_text().strip()
    ray.init(address=address, namespace="modelshare-bench", logging_level="ERROR", log_to_driver=False)


def _give_back_heap() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _weights_holder() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class WeightsHolder:
        """Loads the model once and keeps its state dict in the object store, and its skeleton."""

        def __init__(self, load: Callable[[Path], Any], path: Path) -> None:
            model = load(path)
            state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
            self.refs = [ray.put(state), pickle.dumps(model.to("meta"))]  # in a list: get() hands over the ref
            del model, state
            _give_back_heap()  # the loaded copy goes, as modelshare's loader gives its own back


        def get(self) -> list[Any]:
            return self.refs

    return WeightsHolder


def shared_module(name: str, load: Callable[[Path], Any], path: Path) -> Any:
    """The torch module at ``path``, its weights read-only views of the object store (loaded once,
    by the holder actor ``name``)."""
    import ray
    import torch

    holder = _weights_holder().options(name=name, lifetime="detached", get_if_exists=True).remote(load, path)
    state_ref, skeleton = ray.get(holder.get.remote())
    state = ray.get(state_ref)
    module = pickle.loads(skeleton)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable": the point
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, assign=True)
    return module.eval()
