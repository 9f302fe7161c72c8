"""SharedModel: load a model once, share it across the threads of a process or the processes of a
machine.

The problem: every worker that calls ``load_model()`` pays for the weights again. With

    model = SharedModel(load_model, key="ranker", share="processes")
    with model.use() as m:
        m.predict(batch)

the first process on the machine to ask runs ``load_model`` under an exclusive file lock,
splits the result with a codec (skeleton + buffers), writes the buffers once into a segment
and maps it; every other process waits for that lock, then maps the same segment and rebuilds
the model over zero-copy, read-only views. Compute stays local: no call crosses a process.

Lifetime rules:

* ``acquire()`` returns the model and counts a hold; ``release(model)`` gives it back;
  ``use()`` does both around a ``with`` block. Within a process every acquire of the same model
  (by any thread, through any unpickled copy of the same SharedModel) returns the same object.
* When a process's last hold is released and the caller's own references to the model are gone
  too, it unmaps and drops its shared lock; the last process on the machine unlinks the segment.
  (A released model still referenced is still mapped, so it still counts as held: nothing
  unlinks or evicts memory in use.) A process that
  exits without releasing is released at exit; one killed by SIGKILL is released by the kernel,
  and ``modelshare gc`` (or the next process to attach in the directory) removes what it left.
* ``keep_warm=True`` keeps the segment after its last holder (``share="processes"``), or the
  instance for the life of the process (``share="threads"``).
* The loading process keeps only the shared copy: its private model is dropped after
  publishing and freed heap pages go back to the system (``malloc_trim``).
* Segments are named by key and version. Without ``version=``, the version is a fingerprint of
  the loader's code and bound values, so a changed loader never attaches to a stale segment.

``device="cuda:N"`` goes one step further for PyTorch models: the weights are copied once onto
GPU N, and every process maps that one copy and runs its forward passes on it (``_device_copy``);
the copy outlives whichever process made it and is freed after the last process using it.

``share="threads"`` skips segments: one instance per process, loaded once even when threads race.
``share="server"`` is for models that cannot be split into weights, or for an exact number of
instances: ``copies`` server processes per machine own the model, and ``acquire()`` returns a
client that looks like the model and sends each call to the least busy one (``_server``,
``_client``; arrays travel through shared memory).
SharedModel objects pickle (loaders that are lambdas or closures too, via cloudpickle) so they can
be handed to spawned processes and Beam DoFns; an attaching process never unpickles the loader.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import gc
import hashlib
import multiprocessing.util
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Literal, Optional, Sequence, TypeVar, Union

from . import _segment
from ._budget import Size, parse_size
from ._copies import InstancePool
from ._device_copy import device_driver, parse_device
from ._fingerprint import loader_fingerprint
from .codecs import Codec, Encoded, SegmentBuffers, codec_for, get_codec
from .errors import LoaderError

__all__ = ["SharedModel", "HoldInfo"]

M = TypeVar("M")
Share = Literal["threads", "processes", "server"]
_SHARES = ("threads", "processes", "server")


@dataclass(frozen=True)
class HoldInfo:
    """How this process got the model it holds: for metrics (loads vs. attaches, latency, bytes)."""

    loaded_here: bool  # this process ran the loader (else it attached to another's segment)
    seconds: float  # how long the acquire that brought the model into this process took
    shared_bytes: int  # size of the segment this process maps (0 for share="threads")
    device_bytes: int = 0  # size of the GPU copy this process maps (device="cuda:N")


class _Entry:
    """One model in this process: the object handed out, how many holds, and its segment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refcount = 0
        self.model: Any = None
        self.handle: Optional[_segment.SegmentHandle] = None
        self.device_copy: Any = None  # the GPU copy the model's tensors point into, while held
        self.info: Optional[HoldInfo] = None


class _ProcessTable:
    """Every model this process holds, keyed so that copies of one SharedModel meet here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], _Entry] = {}
        self._swept: set[Path] = set()
        self._exit_hooked = False

    def entry(self, ident: tuple[str, ...]) -> _Entry:
        with self._lock:
            found = self._entries.get(ident)
            if found is None:
                found = self._entries[ident] = _Entry()
            return found

    def prepare_directory(self, directory: Path) -> None:
        """Once per directory: register the exit hook and collect what crashed processes left."""
        with self._lock:
            self._hook_exit()
            first = directory not in self._swept
            self._swept.add(directory)
        if first:
            _segment.sweep(directory)

    def _hook_exit(self) -> None:
        # atexit covers the main process and spawned children; multiprocessing's finalizers
        # also run in forked children, which leave through os._exit and skip atexit.
        if not self._exit_hooked:
            atexit.register(self.release_all)
            multiprocessing.util.Finalize(None, self.release_all, exitpriority=10)
            self._exit_hooked = True

    def release_all(self) -> None:
        """Release every segment this process still holds (at exit: a forgotten release())."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            handle, entry.handle, entry.model, entry.refcount = entry.handle, None, None, 0
            entry.device_copy = None
            if handle is not None:
                with contextlib.suppress(Exception):
                    _segment.release(handle)

    def after_fork_in_child(self) -> None:
        """A forked child shares its parent's lock descriptions: take locks of its own."""
        self._lock = threading.Lock()
        self._exit_hooked = False
        for entry in self._entries.values():
            entry.lock = threading.Lock()
            handle = entry.handle
            if handle is not None:
                fd = _segment.lock_file(handle.name.lock_path, fcntl.LOCK_SH)
                os.close(handle.lock_fd)  # the parent's lock survives: it has its own descriptor
                handle.lock_fd = fd
                self._hook_exit()


_table = _ProcessTable()
os.register_at_fork(after_in_child=_table.after_fork_in_child)


def _reclaim_heap() -> None:
    """Return freed memory to the system: glibc keeps freed heap pages until ``malloc_trim``."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _short_hash(*parts: str) -> str:
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


class SharedModel(Generic[M]):
    """A model loaded once and shared by the threads of a process or the processes of a machine.

    Args:
        loader: zero-argument callable that returns the model; runs once per machine
            (``"processes"``) or once per process (``"threads"``).
        key: the model's name: letters, digits and ``_.=+-``; it names the segment file.
        share: ``"processes"`` (one copy of the weights per machine, zero-copy views in every
            process) or ``"threads"`` (one instance per process).
        version: what decides whether an existing segment is this model (e.g. the weight file's
            mtime); by default a fingerprint of the loader's code and bound values.
        directory: where segments live; default ``$MODELSHARE_DIR`` or ``/dev/shm/modelshare-<uid>``.
        codec: a codec name or instance to force; by default chosen by the loaded model's type.
        keep_warm: keep the model loaded after its last holder releases it.
        timeout: seconds to wait for another process's load before :class:`AcquireTimeoutError`.
        copies: ``share="server"``: how many server processes (model instances) on the machine;
            default one per entry of ``devices``, else 1. With ``"threads"`` / ``"processes"``: N
            instances per process over one copy of the weights, as an ``InstancePool``.
        devices: ``share="server"``: the devices the copies go to, round robin (e.g.
            ``["cuda:0", "cuda:0", "cuda:1"]``); a loader with a ``device`` parameter gets its copy's.
        retries: ``share="server"``: how often a call whose server died runs again on a restarted one.
        idle_exit: ``share="server"``: seconds a server waits after its last client left before exiting.
        device: ``share="processes"``: ``"cuda:N"`` puts the model's torch tensors in one copy on GPU N
            that every process maps and computes on locally (``_device_copy``); the loader returns
            the model on the CPU. Default: the weights stay in host memory.
        gpu_budget: with ``device``: bytes (or ``"20GiB"``) that this directory's GPU copies may
            take on that GPU together; a copy that would not fit raises ``MemoryBudgetExceeded``.
    """

    def __init__(
        self,
        loader: Callable[[], M],
        *,
        key: str,
        share: Share = "processes",
        version: Optional[str] = None,
        directory: Union[str, os.PathLike[str], None] = None,
        codec: Union[str, Codec, None] = None,
        keep_warm: bool = False,
        timeout: Optional[float] = None,
        copies: Optional[int] = None,
        devices: Optional[Sequence[str]] = None,
        retries: int = 0,
        idle_exit: float = 5.0,
        device: Optional[str] = None,
        gpu_budget: Optional[Size] = None,
    ) -> None:
        if not callable(loader):
            raise TypeError(f"loader must be a zero-argument callable returning the model, not {loader!r}")
        if share not in _SHARES:
            raise ValueError(f"share must be 'threads', 'processes' or 'server', not {share!r}")
        if share != "server" and (devices or retries):
            raise ValueError(f"devices and retries are for share='server' (got share={share!r}); "
                             "use share='server', copies=N, devices=[...] for N instances on the machine")
        if device is not None and share != "processes":
            raise ValueError(f"device= puts one copy of the weights on a GPU for every process (share='processes'), "
                             f"not share={share!r}; for a model that cannot be split use share='server', "
                             "devices=[...]")
        if gpu_budget is not None and device is None:
            raise ValueError("gpu_budget= limits the GPU copies of models placed with device='cuda:N'; pass device=")
        self.device = None if device is None else f"cuda:{parse_device(device)}"
        self.gpu_budget = None if gpu_budget is None else parse_size(gpu_budget)
        if copies is not None and (not isinstance(copies, int) or copies < 1):
            raise ValueError(f"copies must be a positive int, not {copies!r}")
        self.devices = [str(d) for d in devices or []]
        self.copies = copies or max(1, len(self.devices))
        self.retries = int(retries)
        self.idle_exit = float(idle_exit)
        self.key = _segment.validate_key(key)
        self.share: Share = share
        self.version = None if version is None else str(version)
        codec_name = codec if isinstance(codec, str) or codec is None else codec.name
        basis = f"version:{self.version}" if version is not None else f"loader:{loader_fingerprint(loader)}"
        self.version_hash = _short_hash(basis, codec_name or "")
        self._loader: Optional[Callable[[], M]] = loader
        self._loader_bytes: Optional[bytes] = None
        self._directory = None if directory is None else Path(directory)
        self._codec = codec
        self.keep_warm = bool(keep_warm)
        self.timeout = timeout

    @classmethod
    def from_onnx(
        cls,
        path_or_bytes: Union[str, os.PathLike[str], bytes],
        *,
        key: Optional[str] = None,
        share: Share = "processes",
        providers: Optional[list[Any]] = None,
        session_options: Any = None,
        prepack: bool = False,
        **kwargs: Any,
    ) -> "SharedModel[Any]":
        """A shared ``onnxruntime.InferenceSession`` whose initializers live once per machine.

        ``path_or_bytes``: an ``.onnx`` file (external data beside it is loaded too) or its bytes.
        ``key`` defaults to the file's stem (or a hash of the bytes); the version to the file's
        size and mtime (or the hash). ``session_options``: a dict or ``onnxruntime.SessionOptions``;
        ``prepack=True`` lets ORT repack weights privately per process (faster kernels, more
        memory). Other keyword arguments go to ``SharedModel``.
        """
        from ._model_source import FileOrBytes
        from .codecs.onnx import OnnxCodec, load_onnx_bytes, load_onnx_file

        source = FileOrBytes(path_or_bytes, "ONNX model", load_onnx_file, load_onnx_bytes)
        kwargs.setdefault("version", source.version())
        key = key or source.default_key("onnx")
        codec = OnnxCodec(providers=providers, session_options=session_options, prepack=prepack)
        if share == "threads":
            return cls(lambda: codec.private_session(source()), key=key, share=share, **kwargs)
        return cls(source, key=key, share=share, codec=codec, **kwargs)

    @classmethod
    def from_tensorrt(
        cls,
        path_or_bytes: Union[str, os.PathLike[str], bytes],
        *,
        key: Optional[str] = None,
        **kwargs: Any,
    ) -> "SharedModel[Any]":
        """A shared TensorRT engine: the plan lives once per machine, each process deserializes it.

        ``acquire()`` returns a ``tensorrt.ICudaEngine``; for N concurrent instances use
        ``modelshare.codecs.tensorrt.engine_contexts(engine, N)``. Needs TensorRT 10+ and a GPU
        where the engine is acquired. Other keyword arguments go to ``SharedModel``.
        """
        from ._model_source import FileOrBytes
        from .codecs.tensorrt import EnginePlan

        source = FileOrBytes(path_or_bytes, "TensorRT engine", EnginePlan.from_file, EnginePlan)
        kwargs.setdefault("version", source.version())
        return cls(source, key=key or source.default_key("trt"), **kwargs)

    # -- identity ---------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """Where this model's segment lives (resolved in the process that uses it)."""
        return self._directory if self._directory is not None else _segment.default_directory()

    @property
    def segment_name(self) -> _segment.SegmentName:
        return _segment.SegmentName.for_model(self.directory, self.key, self.version_hash)

    def _ident(self) -> tuple[str, ...]:
        if self.share == "threads":
            return ("threads", self.key, self.version_hash)
        return (self.share, str(self.directory), self.segment_name.stem, self.device or "")

    def __repr__(self) -> str:
        device = f", device={self.device!r}" if self.device else ""
        return f"SharedModel(key={self.key!r}, share={self.share!r}{device}, version={self.version_hash})"

    # -- acquire / release ------------------------------------------------------------------

    def acquire(self) -> M:
        """The model; loads or attaches it on this process's first hold. Pair with release()."""
        entry = _table.entry(self._ident())
        with entry.lock:
            if entry.refcount == 0 and entry.model is None:
                start = time.perf_counter()
                if self.share == "threads":
                    entry.model = self._pooled_from_loaded(self._run_loader())
                    entry.info = HoldInfo(True, time.perf_counter() - start, 0)
                elif self.share == "server":
                    entry.model = self._client()
                    entry.info = HoldInfo(False, time.perf_counter() - start, 0)
                else:
                    entry.model, entry.handle, published, entry.device_copy = self._attach()
                    entry.info = HoldInfo(published, time.perf_counter() - start, entry.handle.mapping.nbytes,
                                          entry.device_copy.nbytes if entry.device_copy is not None else 0)
            entry.refcount += 1
            return entry.model

    def release(self, model: M) -> None:
        """Give back a model from acquire(); the last release frees this process's hold."""
        entry = _table.entry(self._ident())
        with entry.lock:
            if entry.refcount == 0 or model is not entry.model:
                raise ValueError(
                    f"release() got an object that {self!r} did not hand out, or more releases "
                    "than acquires; pass exactly the object acquire() returned, once per acquire"
                )
            entry.refcount -= 1
            if entry.refcount:
                return
            handle, entry.handle, entry.device_copy = entry.handle, None, None
            if self.share == "server":
                entry.model.close()
            if self.share != "threads" or not self.keep_warm:
                entry.model = None
            if handle is not None:
                _segment.release(handle)

    @contextlib.contextmanager
    def use(self) -> Iterator[M]:
        """``with shared.use() as model:`` -- acquire() on entry, release() on exit."""
        model = self.acquire()
        try:
            yield model
        finally:
            self.release(model)

    # -- loading ----------------------------------------------------------------------------

    def _client(self) -> Any:
        """A client of this model's server copies (started on first call; see ``_client``)."""
        from ._client import ServerClient

        directory = _segment.ensure_directory(self.directory)
        _table.prepare_directory(directory)
        client = ServerClient(self, self.copies, self.devices, self.retries, self.idle_exit, self.timeout)
        client.start()
        return client

    def _get_loader(self) -> Callable[[], M]:
        if self._loader is None:
            import cloudpickle  # only a process that has to load pays for unpickling the loader

            assert self._loader_bytes is not None
            self._loader = cloudpickle.loads(self._loader_bytes)
        return self._loader

    def _run_loader(self) -> M:
        try:
            return self._get_loader()()
        except Exception as exc:
            raise LoaderError(
                f"the loader for model {self.key!r} raised {type(exc).__name__}: {exc}. Nothing "
                "was published and other processes are unaffected; fix the loader -- the next "
                "acquire() runs it again"
            ) from exc

    def _produce(self) -> tuple[dict[str, Any], Encoded, bool]:
        _segment.sweep(self.directory)  # reclaim what crashes left before using more memory
        model = self._run_loader()
        codec = get_codec(self._codec) if isinstance(self._codec, str) else self._codec or codec_for(model)
        encoded = codec.encode(model)
        fields = {
            "key": self.key,
            "version": self.version,
            "version_hash": self.version_hash,
            "codec": codec.name,
            "views": encoded.views,
            "created": time.time(),
            "loader_pid": os.getpid(),
        }
        return fields, encoded, self.keep_warm

    def _decoder(self, codec_name: str) -> Codec:
        """The codec instance given to this SharedModel (it may carry options), else the registry's."""
        if isinstance(self._codec, Codec) and self._codec.name == codec_name:
            return self._codec
        return get_codec(codec_name)

    def holders(self) -> list[int]:
        """Pids of the processes on this machine that hold this model's segment now (from the
        kernel's lock table; empty for ``share="threads"`` and ``"server"``)."""
        if self.share != "processes":
            return []
        return _segment.lock_holders(self.segment_name.lock_path)

    def hold_info(self) -> Optional[HoldInfo]:
        """How this process got the model it holds now, or None if it holds none."""
        entry = _table.entry(self._ident())
        with entry.lock:
            return entry.info if entry.model is not None else None

    def _attach(self) -> tuple[M, _segment.SegmentHandle, bool, Any]:
        if self.device is not None:
            device_driver(self.device, self.key)  # no GPU here: say so before loading anything
        directory = _segment.ensure_directory(self.directory)
        _table.prepare_directory(directory)
        handle, published = _segment.open_or_publish(self.segment_name, self._produce, timeout=self.timeout)
        if published:
            _reclaim_heap()
        try:
            buffers = self._placed(handle.mapping)
            codec = self._decoder(handle.mapping.header["codec"])
            instances = [codec.decode(handle.mapping.skeleton, buffers) for _ in range(self.copies)]
        except BaseException:
            _segment.release(handle)
            raise
        return (instances[0] if self.copies == 1 else InstancePool(instances)), handle, published, buffers.device

    def _placed(self, mapping: Any) -> SegmentBuffers:
        """The segment's buffers, with the model's GPU copy where ``device`` asks for one (the copy
        lives as long as the tensors built on it; see ``_device_copy``)."""
        if self.device is None:
            return mapping.buffers
        from ._device_copy import open_device_copy

        placement = open_device_copy(mapping, self.segment_name, self.device, key=self.key,
                                     gpu_budget=self.gpu_budget, timeout=self.timeout)
        return SegmentBuffers(mapping.buffers, mapping.buffers.path, mapping.buffers.offsets, device=placement)

    def _pooled_from_loaded(self, model: M) -> Any:
        """``copies`` instances over ``model``'s buffers where its codec can rebuild it from them,
        else loaded again; the model itself when one copy is asked for."""
        if self.copies == 1:
            return model
        instances = [model]
        try:
            codec = get_codec(self._codec) if isinstance(self._codec, str) else self._codec or codec_for(model)
            encoded = codec.encode(model)
            rebuild = functools.partial(codec.decode, memoryview(encoded.skeleton), SegmentBuffers(encoded.buffers))
            instances.append(rebuild())
        except Exception:
            rebuild = self._run_loader  # this codec cannot: every instance is a load of its own
            instances.append(rebuild())
        instances += [rebuild() for _ in range(self.copies - 2)]
        return InstancePool(instances)

    # -- pickling ---------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        if self._loader_bytes is None:
            import cloudpickle

            try:
                self._loader_bytes = cloudpickle.dumps(self._loader)
            except Exception as exc:
                raise TypeError(
                    f"{self!r} cannot be pickled because its loader cannot ({type(exc).__name__}: "
                    f"{exc}); use a module-level function, or a closure over picklable values"
                ) from exc
        state = {
            "key": self.key,
            "share": self.share,
            "version": self.version,
            "version_hash": self.version_hash,
            "_loader_bytes": self._loader_bytes,
            "_directory": self._directory,
            "_codec": self._codec,
            "keep_warm": self.keep_warm,
            "timeout": self.timeout,
            "copies": self.copies,
            "devices": self.devices,
            "retries": self.retries,
            "idle_exit": self.idle_exit,
            "device": self.device,
            "gpu_budget": self.gpu_budget,
        }
        return (_restore, (state,))


def _restore(state: dict[str, Any]) -> SharedModel[Any]:
    shared: SharedModel[Any] = SharedModel.__new__(SharedModel)
    shared.__dict__.update(state)
    shared._loader = None
    return shared
