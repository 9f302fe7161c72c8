"""SharedModel: load a model once, share it across the threads of a process or the processes of a
machine.

The problem: every worker that calls ``load_model()`` pays for the weights again. With

    model = SharedModel(load_model, key="ranker")            # share="processes", the default
    with model.use() as m:
        m.predict(batch)

the first process on the machine to ask runs ``load_model`` under an exclusive file lock,
splits the result with a codec (skeleton + buffers), writes the buffers once into a segment
and maps it; every other process waits for that lock, then maps the same segment and rebuilds
the model over zero-copy, read-only views. Compute stays local: no call crosses a process.

How it is shared is the *mode* (``share=``; ``_modes``): ``"processes"`` (the above; ``Processes(
device="cuda:N")`` also keeps one copy per GPU), ``"threads"`` (one instance per process, loaded
once even when threads race) or ``"server"`` (``Server(copies=N)``: N server processes own the
model, for models that cannot be split into weights or an exact number of instances per machine;
``acquire()`` returns a client that looks like the model). A SharedModel itself is only identity
and bookkeeping: key, version, where its files live, and a refcount per process.

Lifetime rules:

* ``acquire()`` returns the model and counts a hold; ``release(model)`` gives it back;
  ``use()`` does both around a ``with`` block. Within a process every acquire of the same model
  (by any thread, through any unpickled copy of the same SharedModel) returns the same object.
  ``instance()`` returns a new instance each time (its own state, the same weights), held until
  it is released or garbage.
* When a process's last hold is released and the caller's own references to the model are gone
  too, it unmaps and drops its shared lock; the last process on the machine unlinks the segment.
  (A released model still referenced is still mapped, so it still counts as held: nothing
  unlinks or evicts memory in use.) A process that exits without releasing is released at exit;
  one killed by SIGKILL is released by the kernel, and ``modelshare gc`` (or the next process to
  attach in the directory) removes what it left. A forked child holds what its parent held, on
  locks and connections of its own (``_process``).
* ``keep_warm=True`` keeps the segment after its last holder (``"processes"``), or the instance
  for the life of the process (``"threads"``).
* Segments are named by key and version. Without ``version=``, the version is a fingerprint of
  the loader's code and bound values, and of the identity of the files it reads (``watch=``, or
  the loader's ``files``; ``_model_source``), so a changed loader or new weights on disk never
  attach to a stale segment. ``refresh()`` moves a long-lived process to the files' current version.

SharedModel objects pickle (loaders that are lambdas or closures too, via cloudpickle) so they can
be handed to spawned processes and Beam DoFns; an attaching process never unpickles the loader.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Literal, Optional, TypeVar, Union

from . import _process
from ._fingerprint import blake2b, loader_fingerprint
from ._host.directory import SegmentName, default_directory, validate_key
from ._model_source import PathLike, files_identity, watched_files
from ._modes import HoldInfo, Mode
from ._modes.processes import Processes
from ._modes.server import Server
from ._modes.threads import Threads
from .codecs import Codec, codec_for, get_codec
from .errors import AcquireTimeoutError, LoaderError

__all__ = ["SharedModel"]

M = TypeVar("M")
Share = Union[str, Mode]
_MODES: dict[str, type[Mode]] = {"threads": Threads, "processes": Processes, "server": Server}


def _as_mode(share: Share) -> Mode:
    """``share=`` as a mode: a mode object as is, or a mode's name with its defaults."""
    if isinstance(share, Mode):
        return share
    if share not in _MODES:
        raise ValueError(f"share must be 'threads', 'processes', 'server', or modelshare.Threads(...), "
                         f"Processes(...) or Server(...) with options, not {share!r}")
    return _MODES[share]()


#: seconds a process keeps its hold after its last release, unless ``linger=`` or $MODELSHARE_LINGER says
DEFAULT_LINGER = 10.0


def _linger(linger: Optional[float]) -> float:
    """``linger=`` checked, or the default ($MODELSHARE_LINGER, else ``DEFAULT_LINGER``)."""
    where = "linger"
    if linger is None:
        where, text = "$MODELSHARE_LINGER", os.environ.get("MODELSHARE_LINGER")
        try:
            linger = DEFAULT_LINGER if text is None else float(text)
        except ValueError:
            raise ValueError(f"$MODELSHARE_LINGER must be a number of seconds >= 0, not {text!r}") from None
    if isinstance(linger, bool) or not isinstance(linger, (int, float)) or not linger >= 0:
        raise ValueError(f"{where} must be a number of seconds >= 0 (0: let go at the last release), not {linger!r}")
    return float(linger)


def _short_hash(*parts: str) -> str:
    return blake2b("\0".join(parts).encode(), digest_size=8).hexdigest()


class SharedModel(Generic[M]):
    """A model loaded once and shared by the threads of a process or the processes of a machine.

    Args:
        loader: zero-argument callable that returns the model; runs once per machine
            (``"processes"``), once per process (``"threads"``) or once per server (``"server"``).
        key: the model's name: letters, digits and ``_.=+-``; it names the segment file.
        share: how the model is shared: ``"processes"`` (default; one copy of the weights per
            machine, zero-copy views in every process), ``"threads"`` (one instance per process),
            ``"server"`` (server processes own the model), or ``Processes(...)``, ``Threads(...)``,
            ``Server(...)`` with the options of that mode (GPU copies, instances, server copies).
        version: what decides whether an existing segment is this model (e.g. a release tag); by
            default a fingerprint of the loader's code and bound values and of the watched files.
        watch: the files the loader reads: their identity (device, inode, size, mtime) is part of
            the version, so new weights on disk are a new version. Default: the loader's ``files``
            (``modelshare.loaders`` and ``from_onnx``/``from_tensorrt`` name theirs). Not with ``version=``.
        directory: where segments live; default ``$MODELSHARE_DIR`` or ``/dev/shm/modelshare-<uid>``.
            It must be this user's alone (not a symlink, not writable by others: ``docs/trust.md``).
        codec: a codec name or instance to force; by default chosen by the loaded model's type
            (not for ``"server"``, which loads the model whole).
        keep_warm: keep the model loaded after its last release: the segment stays on the machine
            (``"processes"``), the instance in the process (``"threads"``).
        linger: seconds this process keeps its hold after its last release -- the model, its
            mapping, the segment on the machine -- so that ``use()`` per request, or a release and
            an acquire a moment apart, cost what holding the model costs instead of a reload.
            Default ``$MODELSHARE_LINGER`` or 10; 0 lets go at once. Gone at exit whatever it says.
        timeout: seconds ``acquire()`` waits for the model to become available -- another
            thread's or process's load, a server's start, a GPU copy's keeper -- before
            :class:`AcquireTimeoutError`; None (the default): as long as it takes.
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
        linger: Optional[float] = None,
        watch: Optional[Iterable[PathLike]] = None,
    ) -> None:
        if not callable(loader):
            raise TypeError(f"loader must be a zero-argument callable returning the model, not {loader!r}")
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, or None to wait as long as it takes, "
                             f"not {timeout!r}")
        self.key = validate_key(key)
        self.mode: Mode = _as_mode(share)
        if version is not None and watch is not None:
            raise ValueError("pass version= or watch=, not both: version= decides alone; watch= makes the "
                             "watched files' identity part of the loader's version")
        self.version = None if version is None else str(version)
        codec_name = codec if isinstance(codec, str) or codec is None else f"{codec.name}:{codec.layout}".rstrip(":")
        basis = f"version:{self.version}" if version is not None else f"loader:{loader_fingerprint(loader)}"
        self._version_basis = f"{basis}\0{codec_name or ''}"
        self.watched: tuple[str, ...] = () if version is not None else watched_files(watch, loader)
        self.version_hash = self._version_of_files()
        self._retired: list[tuple[str, ...]] = []  # the idents of versions refresh() left behind
        self._loader: Optional[Callable[[], M]] = loader
        self._loader_bytes: Optional[bytes] = None
        self._directory = None if directory is None else Path(directory)
        self.codec_option = codec
        self.keep_warm = bool(keep_warm)
        self.timeout = timeout
        self.linger = _linger(linger)
        self._admit_publish: Optional[Callable[[int], None]] = None  # a router's check of the exact size
        self.mode.check(self)


    def _version_of_files(self) -> str:
        """The version hash for the watched files as they are now."""
        if not self.watched:
            return _short_hash(self._version_basis)
        return _short_hash(self._version_basis, files_identity(self.watched))

    @classmethod
    def from_onnx(
        cls,
        path_or_bytes: Union[str, os.PathLike[str], bytes],
        *,
        key: Optional[str] = None,
        share: Share = "processes",
        providers: Optional[list[Any]] = None,
        session_options: Any = None,
        prepack: Union[bool, Literal["shared"]] = False,
        **kwargs: Any,
    ) -> "SharedModel[Any]":
        """A shared ``onnxruntime.InferenceSession`` whose initializers live once per machine.

        ``path_or_bytes``: an ``.onnx`` file (external data beside it is loaded too) or its bytes.
        ``key`` defaults to the file's stem (or a hash of the bytes); the version follows the
        file's identity (``watch=``; external data files are not watched: name them in ``watch=``
        if they change alone) or the bytes. ``session_options``: a dict or ``onnxruntime.SessionOptions``.
        ``prepack``: ``False`` keeps one copy of the weights (kernels pack them on every call);
        ``True`` lets ORT pack them privately per process (fast calls, a copy per process);
        ``"shared"`` packs once into the segment (fast calls, the segment holds the weights and
        their packed layouts; CPU only). Other keyword arguments go to ``SharedModel``.
        """
        from ._model_source import FileOrBytes
        from .codecs.onnx import OnnxCodec, load_onnx_bytes, load_onnx_file

        source = FileOrBytes(path_or_bytes, "ONNX model", load_onnx_file, load_onnx_bytes)
        key = key or source.default_key("onnx")
        codec = OnnxCodec(providers=providers, session_options=session_options, prepack=prepack)
        if _as_mode(share).name != "processes":  # a session of its own in each process (or server)
            if "version" not in kwargs:
                kwargs.setdefault("watch", source.files)
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
        return cls(source, key=key or source.default_key("trt"), **kwargs)

    # -- identity ---------------------------------------------------------------------------

    @property
    def share(self) -> str:
        """The mode's name: ``"threads"``, ``"processes"`` or ``"server"`` (its options: ``mode``)."""
        return self.mode.name

    @property
    def directory(self) -> Path:
        """Where this model's segment lives (resolved in the process that uses it)."""
        return self._directory if self._directory is not None else default_directory()

    @property
    def segment_name(self) -> SegmentName:
        return SegmentName.for_model(self.directory, self.key, self.version_hash)

    def __repr__(self) -> str:
        return f"SharedModel(key={self.key!r}, share={self.mode!r}, version={self.version_hash})"

    def _with(self, **changes: Any) -> "SharedModel[M]":
        """A copy with some attributes changed (``mode``, ``keep_warm``): what a router holds."""
        changed = copy.copy(self)
        changed.__dict__.update(changes)
        changed.mode.check(changed)
        return changed

    # -- acquire / release ------------------------------------------------------------------

    def acquire(self) -> M:
        """The model; loads or attaches it on this process's first hold. Pair with release()."""
        with self._held_entry() as entry:
            entry.refcount += 1
            return entry.held.model  # type: ignore[union-attr,no-any-return]

    def instance(self) -> M:
        """A model instance of its own -- its own Python objects and state, so a stateful model
        behaves as if loaded alone -- over the weights every holder shares (once per machine for
        ``"processes"``, once per process for ``"threads"``). Counted as a hold until
        ``release(instance)`` or until it is garbage (Beam drops an instance that timed out).
        Not for ``"server"``, whose model lives in the servers: TypeError."""
        with self._held_entry() as entry:
            try:
                model = entry.held.new_instance()  # type: ignore[union-attr]
            except BaseException:
                self._let_go_if_unused(entry)
                raise
            key = id(model)
            try:
                entry.instances[key] = _process.when_collected(model, lambda ref: self._collected(entry, key, ref))
            except TypeError:  # cannot be weakly referenced: held until release() or exit
                entry.instances[key] = lambda: model
            return model

    def release(self, model: M, *, linger: Optional[float] = None) -> None:
        """Give back a model from acquire() or instance(); the last release frees this process's
        hold ``linger`` seconds later (default: the SharedModel's ``linger``; 0: now -- in a
        shutdown hook of a server whose workers then die by a signal, skipping exit handlers)."""
        linger = self.linger if linger is None else _linger(linger)
        for ident in (self.mode.ident(self), *reversed(self._retired)):  # this version, then those refresh() left
            entry = _process.model_entry(ident)
            with entry.lock:
                held = entry.held
                reference = entry.instances.get(id(model))
                if reference is not None and reference() is model:
                    del entry.instances[id(model)]
                elif entry.refcount and held is not None and model is held.model:
                    entry.refcount -= 1
                else:
                    continue
                self._let_go_if_unused(entry, linger)
                return
        raise ValueError(
            f"release() got an object that {self!r} did not hand out, or more releases "
            "than acquires; pass exactly the object acquire() or instance() returned, once"
        )

    @contextlib.contextmanager
    def _held_entry(self) -> Iterator[_process.ModelEntry]:
        """This model's entry, locked, with the mode's hold taken (the first hold loads or attaches)."""
        entry = _process.model_entry(self.mode.ident(self))
        if not entry.lock.acquire(timeout=-1 if self.timeout is None else self.timeout):
            raise AcquireTimeoutError(f"waited {self.timeout:g} s for another thread of this process to load "
                                      f"model {self.key!r}; raise timeout=")
        try:
            if entry.held is None:
                entry.held = self.mode.hold(self)
            entry.lingering = None  # taken again before its linger ran out: nothing to let go
            yield entry
        finally:
            entry.lock.release()

    def _let_go_if_unused(self, entry: _process.ModelEntry, linger: Optional[float] = None) -> None:
        """Free the hold once nothing handed out is held (unless the mode keeps it) -- ``linger``
        seconds later, if no acquire comes first. Under entry.lock."""
        if entry.in_use or entry.held is None:
            return
        retired = entry.held.retired
        if entry.held.stays_loaded and not retired:
            return
        linger = self.linger if linger is None else linger
        if linger > 0 and not retired:
            token = entry.lingering = object()
            _process.after(linger, lambda: self._linger_over(entry, token))
            return
        held, entry.held, entry.lingering = entry.held, None, None
        held.release()

    def _linger_over(self, entry: _process.ModelEntry, token: object) -> None:
        """A linger ran out (the reaper thread runs this): let go, unless the model was taken since."""
        with entry.lock:
            if entry.lingering is not token or entry.in_use or entry.held is None:
                return
            held, entry.held, entry.lingering = entry.held, None, None
            held.release()

    def _collected(self, entry: _process.ModelEntry, key: int, reference: Any) -> None:
        """An instance became garbage: it no longer holds the model (the reaper thread runs this)."""
        with entry.lock:
            if entry.instances.get(key) is reference:  # not an id reused by a newer instance
                del entry.instances[key]
                self._let_go_if_unused(entry)

    @contextlib.contextmanager
    def use(self) -> Iterator[M]:
        """``with shared.use() as model:`` -- acquire() on entry, release() on exit."""
        model = self.acquire()
        try:
            yield model
        finally:
            self.release(model)

    def holders(self) -> list[int]:
        """Pids of the processes on this machine that hold this model's segment now (from the
        kernel's lock table; empty for ``share="threads"`` and ``"server"``)."""
        return self.mode.holders(self)

    def refresh(self) -> bool:
        """Move to the watched files' current version if they changed (True), else nothing (False).

        For a long-lived process (a server worker) whose weights file was replaced: the next
        ``acquire()`` loads or attaches the new version, while models handed out before are
        released as usual; this process lets go of the old version at once if it no longer uses
        it (no linger, no ``keep_warm``), else at its last release, and the old segment is
        unlinked when its last holder on the machine lets go. Copies of this SharedModel elsewhere
        keep their version until they refresh too (a new process computes it afresh)."""
        if not self.watched:
            return False
        version_hash = self._version_of_files()
        if version_hash == self.version_hash:
            return False
        old = self.mode.ident(self)
        self.version_hash = version_hash
        self._retired.append(old)
        entry = _process.model_entry(old)
        with entry.lock:
            if entry.held is not None:
                entry.held.retired = True
                self._let_go_if_unused(entry)
        return True

    def hold_info(self) -> Optional[HoldInfo]:
        """How this process got the model it holds now, or None if it holds none."""
        entry = _process.model_entry(self.mode.ident(self))
        with entry.lock:
            return entry.held.info if entry.held is not None else None

    # -- for the modes: the loader and the codec ----------------------------------------------

    def _loader_function(self) -> Callable[[], M]:
        """The loader (unpickled on first use: only a process that loads pays for it)."""
        if self._loader is None:
            import cloudpickle

            assert self._loader_bytes is not None
            self._loader = cloudpickle.loads(self._loader_bytes)
        return self._loader

    def _load(self) -> M:
        """Run the loader; its failure is a :class:`LoaderError`."""
        try:
            return self._loader_function()()
        except Exception as exc:
            raise LoaderError.caused_by(
                f"the loader for model {self.key!r} raised {type(exc).__name__}: {exc}. Nothing "
                "was published and other processes are unaffected; fix the loader -- the next "
                "acquire() runs it again", exc) from exc

    def _codec_for(self, model: Any) -> Codec:
        """The codec that splits ``model``: the one given, else the registry's for its type."""
        if isinstance(self.codec_option, str):
            return get_codec(self.codec_option)
        return self.codec_option or codec_for(model)

    def _decoder(self, codec_name: str) -> Codec:
        """The codec instance given to this SharedModel (it may carry options), else the registry's."""
        if isinstance(self.codec_option, Codec) and self.codec_option.name == codec_name:
            return self.codec_option
        return get_codec(codec_name)

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
        # a router's check stays with it; versions it left are this process's business
        state = dict(self.__dict__, _loader=None, _admit_publish=None, _retired=[])
        return (_restore, (state,))


def _restore(state: dict[str, Any]) -> SharedModel[Any]:
    shared: SharedModel[Any] = SharedModel.__new__(SharedModel)
    shared.__dict__.update(state)
    return shared
