"""SharedModelHandler: any Beam ModelHandler, with its model loaded once per machine.

Beam's RunInference loads a model per SDK worker process (``Shared``), or, with
``large_model=True``, in one process that every batch is pickled to and from over a socket. Wrap
the handler you already have and nothing else in the pipeline changes::

    handler = SharedModelHandler(PytorchModelHandlerTensor(state_dict_path=..., model_class=...))
    predictions = examples | RunInference(handler)

``load_model`` goes through :class:`modelshare.SharedModel`: the first worker process on the
machine runs the wrapped handler's ``load_model`` and publishes the weights; every other worker
attaches and computes locally on zero-copy views. Every other method -- batching kwargs,
``run_inference``, preprocess and postprocess functions, metrics namespace, resource hints,
environment variables, model updates -- is the wrapped handler's, so ``with_exception_handling``,
``with_no_batching``, ``KeyedModelHandler`` and side-input model updates behave as before.

Beam's contracts hold as unwrapped (``tests/beam_adapter/test_contracts.py``): each call of
``load_model`` returns an instance of its own (``SharedModel.instance()``) -- Beam asks one per
transform, per model update and after a timed-out batch, and releases it by dropping it -- so a
stateful model behaves as unwrapped while its weights stay once per machine; a load failure
raises an instance of what the handler raised (a ``LoaderError`` too); a PyTorch handler built for
a GPU the machine lacks falls back with Beam's own warning; a model that cannot be split runs one
per process (with a warning naming why) unless ``share="processes"`` was asked for.

How the model is shared is decided by ``_share_model``: the generic path shares whatever the
handler's ``load_model`` returns (a torch module, a scikit-learn estimator); ONNX Runtime
handlers, whose ``load_model`` returns an unpicklable ``InferenceSession``, are shared from their
model file with ``SharedModel.from_onnx``. Server mode (one client per process and handler
settings: every transform calls the same servers), exact copies and keyed routing under a byte
budget plug in there, behind the same constructor (``budget=``: ``_keyed``). A keyed handler over
several models without a budget runs as Beam runs it (Beam's manager keeps one copy per machine).

Model updates (``model_metadata_pcoll``): Beam calls ``update_model_path`` and then
``load_model``; the new path is part of the segment's version, so the new model is loaded once per
machine. Windows run out of order, so a worker may meet the version it just left: each worker
keeps the versions it moved on from for ``keep_previous`` seconds (at most two), and a return to
one attaches instead of loading (``_versions``); then the last process to let go of a version
unlinks its segment.

What the wrapper adds around ``run_inference``: ragged batches (``ragged=``) and out-of-memory
splitting (``_batches``), intra-op threads shared out among the processes that hold the model
(``modelshare.threads``), and Beam metrics that add up across workers -- counters
``modelshare_loads`` / ``modelshare_attaches`` (one per process that took the model), their
latency distributions (``modelshare_load_latency_ms`` / ``modelshare_attach_latency_ms``), and
distributions of bytes shared (``modelshare_shared_bytes``: the segment each process maps), on the
GPU (``modelshare_gpu_bytes``, with ``device=``) and private (``modelshare_private_bytes``: what
loading added to the process's anonymous memory -- heap, private copies; the segment is a shared
file mapping and not in it): their sums are the machine's
totals, their counts the processes -- reported from the first batch, since Beam drops metrics set
outside a bundle; and ``modelshare_call_size``, the elements of each call the model got.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, MaybeKeyedModelHandler, ModelHandler, PredictionResult

from modelshare import (
    Budget,
    EncodeError,
    HoldInfo,
    LoaderError,
    ModelRouter,
    Processes,
    Server,
    SharedModel,
    loader_fingerprint,
    make_key,
    memory,
)
from modelshare.threads import Threads, ThreadShare

from . import _versions
from ._batches import BatchRunner, Ragged, window_kwargs
from ._devices import fall_back_to_cpu, handler_device, usable_device
from ._keyed import is_multi_model, keyed_router, run_keyed
from ._loaders import cpu_loader, lean_loader

__all__ = ["SharedModelHandler", "release_all"]

_log = logging.getLogger(__name__)


def _default_key(handler: ModelHandler) -> str:
    return make_key(f"beam-{type(handler).__name__}", "beam-model")


def _is_server_only(handler: ModelHandler) -> bool:
    """A handler whose model is a process of its own (vLLM's server): never loaded to be split."""
    return any(cls.__module__ == "apache_beam.ml.inference.vllm_inference" for cls in type(handler).__mro__)


def _is_onnx_handler(handler: ModelHandler) -> bool:
    return any(cls.__module__ == "apache_beam.ml.inference.onnx_inference" for cls in type(handler).__mro__)


# What this process holds through the adapter: instances (one per transform, as Beam asks them;
# released when Beam drops them, or by release_all) and server clients (one per handler settings,
# replaced by a model update). Beam gives handlers no teardown: the rest goes at exit.
_instances: list[tuple[SharedModel[Any], Callable[[], Any]]] = []
_servers: dict[tuple[str, str, str], tuple[SharedModel[Any], Any]] = {}
_holds_lock = threading.Lock()


def _remember(shared: SharedModel[Any], model: Any) -> None:
    try:
        reference: Callable[[], Any] = weakref.ref(model)
    except TypeError:  # Beam's Shared needs a weak reference too; outside Beam, hold it strongly
        reference = lambda: model  # noqa: E731
    with _holds_lock:
        _instances[:] = [(s, r) for s, r in _instances if r() is not None] + [(shared, reference)]


def release_all() -> None:
    """Let go of every model this process holds through the adapter (e.g. after an in-process
    pipeline run); worker processes let go when they exit."""
    with _holds_lock:
        instances = [(shared, r()) for shared, r in _instances]
        servers = list(_servers.values())
        _instances.clear()
        _servers.clear()
    _versions.release_all()
    for shared, model in instances + servers:
        if model is not None:
            with contextlib.suppress(ValueError):  # already released: a garbage instance the reaper took
                shared.release(model)


class SharedModelHandler(ModelHandler):
    """Wraps a Beam ``ModelHandler`` so that its model is loaded once per machine and shared.

    Args:
        handler: the handler to wrap (PyTorch, scikit-learn, ONNX, keyed, or your own).
        share: ``"processes"`` (one copy of the weights per machine, local compute in every SDK
            worker process), ``"threads"`` (one copy per process, like Beam's default) or
            ``"server"`` (``copies`` server processes own the model; for models that cannot be split
            into weights). Default: the wrapped handler's own meaning -- ``model_copies=N`` gives
            ``"server"`` with N copies, anything else ``"processes"`` (``large_model=True`` on a
            model that cannot be split falls back to one server).
        copies: ``share="server"``: exactly this many model instances on the machine.
        budget: for a ``KeyedModelHandler([KeyModelMapping(...), ...])``: route its models under
            this machine-wide byte budget (``modelshare.Budget(host="4GiB")``) instead of Beam's
            per-process model count (``max_models_per_worker_hint``); see ``_keyed``.
        key: the segment's name; defaults to ``beam-<handler class>``.
        version: what identifies the model; defaults to a fingerprint of the handler (its class,
            code and settings, model path included), extended by each model update's path.
        directory: the segment directory (default ``$MODELSHARE_DIR`` or ``/dev/shm/modelshare-<uid>``).
        ragged: ``None`` (batches as they come), ``"bucket"`` (one call per distinct shape in a
            window of the bundle), ``"pad"`` or ``Pad(value, mask_arg, crop, full_mask, max_waste)``
            (length groups padded to their largest shape, with a mask; see ``_batches``).
        split_on_oom: retry a batch that runs out of memory in halves, and cap batch sizes after.
        threads: intra-op threads per worker: ``"auto"`` (cores ÷ processes sharing the model),
            a number, or None (the frameworks' defaults).
        device: ``"cuda:N"``: one copy of the weights on GPU N that every worker process computes on
            (``SharedModel(device=...)``). A PyTorch handler built with ``device="GPU"`` gets
            ``"cuda:0"`` by default (its batches already go there); other handlers must move their
            inputs to the same device themselves.
        keep_previous: after a model update (``model_metadata_pcoll``), seconds each worker keeps
            the version it moved on from (at most two of them), so windows that still see it
            attach instead of loading it again; 0 lets it go at once (``_versions``).
    """

    def __init__(self, handler: ModelHandler, share: Optional[str] = None, *, copies: Optional[int] = None,
                 key: Optional[str] = None, version: Optional[str] = None, directory: Optional[str] = None,
                 ragged: Ragged = None, split_on_oom: bool = True, threads: Threads = "auto",
                 budget: Optional[Budget] = None, device: Optional[str] = None,
                 keep_previous: float = 300.0) -> None:
        if not isinstance(handler, ModelHandler):
            raise TypeError(f"SharedModelHandler wraps a Beam ModelHandler, not {type(handler).__qualname__}")
        if not keep_previous >= 0:
            raise ValueError(f"keep_previous is seconds a previous model version stays held (0: none), "
                             f"not {keep_previous!r}")
        if budget is not None and (not is_multi_model(handler) or share not in (None, "processes")):
            raise ValueError("budget= routes the models of a KeyedModelHandler([KeyModelMapping(...), ...]) under "
                             "a byte budget (share='processes'); wrap such a handler, or leave budget out")
        if share not in (None, "processes", "threads", "server"):
            raise ValueError(f"share must be 'processes', 'threads' or 'server', not {share!r}")
        if copies is not None and share not in (None, "server"):
            raise ValueError("copies=N is for share='server' (exactly N model instances on the machine)")
        self._device_asked = device is not None
        device = handler_device(handler, device)
        if device is not None and (share not in (None, "processes") or budget is not None):
            if self._device_asked:
                raise ValueError("device= puts one copy of the model on a GPU for every worker process "
                                 "(share='processes', no budget=); for a model that cannot be split, use "
                                 "share='server'")
            device = None  # threads, server: the handler places its model itself, as unwrapped
        super().__init__()
        self._device = device
        self._handler = handler
        beams_copies = handler.model_copies() if handler.share_model_across_processes() else 1
        # Beam's own sharing keeps its meaning: model_copies=N -> N server copies; large_model -> one copy
        # per machine (weights shared, compute local; a server if the model cannot be split)
        server_only = _is_server_only(handler) or (copies or beams_copies) > 1
        self._share = share or ("server" if server_only else "processes")
        self._copies = copies or (beams_copies if self._share == "server" else 1)
        self._server_fallback = share is None and handler.share_model_across_processes()
        self._share_asked = share
        self._key = key or _default_key(handler)
        self._version = version or loader_fingerprint(handler.load_model)
        self._model_path = ""
        self._keep_previous = keep_previous
        self._directory = directory
        self._batches = None
        if ragged is not None or split_on_oom:
            batching = handler.batch_elements_kwargs()
            self._batches = BatchRunner(ragged, batching.get("max_batch_size"), on_call=self._count_call,
                                        size_fn=batching.get("element_size_fn"),
                                        max_weight=batching.get("max_batch_weight"))
        self._pending_metrics: Optional[tuple[HoldInfo, int]] = None
        self._threads = ThreadShare(threads)
        self._shared: Optional[SharedModel[Any]] = None
        self._budget = budget
        # a keyed handler over several models without a budget runs as Beam runs it: Beam's manager
        # keeps one copy of each model per machine itself (budget= routes them under a byte budget)
        self._beams_own = budget is None and is_multi_model(handler)

    # -- loading: the one thing this wrapper changes -----------------------------------------

    def load_model(self) -> Any:
        """A model instance of the wrapped handler's, over weights loaded once per machine: a new
        one per call, as Beam asks one per transform (or ``model_identifier``), per model update
        and after a timeout, and releases it by dropping it. (``share="server"``: the client of the
        handler's servers; with a budget: a router over the keyed handler's models.)"""
        if fall_back_to_cpu(self._handler) and not self._device_asked:
            self._device = None
        if self._budget is not None:
            return keyed_router(self._handler, self._budget, self._directory)
        if self._beams_own:
            return self._handler.load_model()
        if self._share == "server":
            return self._server_client()
        shared = self._share_model()
        first = shared.hold_info() is None
        before = memory.anonymous_bytes() if first else 0  # /proc/self/status: no smaps walk on the load path
        try:
            model = shared.instance()
        except EncodeError as exc:
            return self._unsplittable(exc)
        _remember(shared, model)
        _versions.note_current(shared, self._keep_previous)
        self._shared = shared
        info = shared.hold_info()
        if first and info is not None:  # reported from run_inference: Beam drops metrics outside a bundle
            self._pending_metrics = (info, max(0, memory.anonymous_bytes() - before))
        return model

    def _unsplittable(self, error: EncodeError) -> Any:
        """What a model that cannot be split into weights gets: a server where the handler asked
        for Beam's sharing (``large_model``), an error where ``share="processes"`` was asked for,
        else one instance per transform in each process -- Beam's default -- with a warning."""
        name = f"{type(self._handler).__name__}.load_model()"
        if self._server_fallback:
            self._share = "server"  # large_model=True on a model that cannot be split: Beam's meaning
            return self._server_client()
        if self._share_asked == "processes":
            raise EncodeError(
                f"the model that {name} returns cannot be split into shared weights ({error}). Use "
                "SharedModelHandler(handler, share='server') for one copy per machine in a server process, "
                "or share='threads' for one copy per process"
            ) from error
        _log.warning("the model that %s returns cannot be split into shared weights (%s): every worker process "
                     "loads its own, as without modelshare. share='server' keeps one copy per machine in a server "
                     "process; share='threads' says that one per process is meant (and this warning goes)",
                     name, error)
        self._share = "threads"
        return self.load_model()

    def _server_client(self) -> Any:
        """The client of this handler's servers, one per process and handler settings (every
        transform calls the same servers); a model update replaces it."""
        shared = self._share_model()
        slot = (str(shared.directory), self._key, self._version)
        with _holds_lock:
            previous = _servers.get(slot)
            if previous is not None and previous[0].version_hash == shared.version_hash:
                self._shared = previous[0]
                return previous[1]
            model = shared.acquire()
            _servers[slot] = (shared, model)
            self._shared = shared
        if previous is not None:  # a model update: let the old version go once the new one is in place
            previous[0].release(previous[1])
        return model

    def _share_model(self) -> SharedModel[Any]:
        version = f"{self._version}:{self._model_path}"
        if _is_onnx_handler(self._handler) and self._share == "processes":
            handler = self._handler  # Beam's OnnxModelHandler* keep what a session needs in these
            providers = list(handler._providers)
            if handler._provider_options:
                providers = list(zip(providers, handler._provider_options))
            from modelshare.codecs.onnx import session_options_dict

            options = session_options_dict(handler._session_options)
            try:
                shared = SharedModel.from_onnx(handler._model_uri, key=self._key, version=version,
                                               directory=self._directory, providers=providers,
                                               session_options=options)
            except OSError as exc:  # what the handler's own load_model would have met: a load failure
                raise LoaderError.caused_by(f"{type(handler).__name__} cannot load its model: {exc}", exc) from exc
            threads = self._threads.count(shared, joining=True)
            if "intra_op_num_threads" in options or threads is None:
                return shared
            # ORT fixes its pool at session creation: take the share of the processes holding the
            # model now, this one included
            options["intra_op_num_threads"] = threads
            return SharedModel.from_onnx(handler._model_uri, key=self._key, version=version,
                                         directory=self._directory, providers=providers, session_options=options)
        if self._share == "server":
            return SharedModel(self._handler.load_model, key=self._key, share=Server(copies=self._copies),
                               version=version, directory=self._directory)
        if self._share == "threads":
            return SharedModel(self._handler.load_model, key=self._key, share="threads", version=version,
                               directory=self._directory)
        loader = lean_loader(self._handler) or self._handler.load_model
        self._device = usable_device(self._handler, self._device, self._device_asked, self._key)
        if self._device is not None:
            loader = cpu_loader(self._handler)
        return SharedModel(loader, key=self._key, share=Processes(device=self._device), version=version,
                           directory=self._directory)

    def update_model_path(self, model_path: Optional[str] = None) -> None:
        self._handler.update_model_path(model_path)
        self._model_path = model_path or ""

    def update_model_paths(self, model: Any, model_paths: Any = None) -> None:
        self._handler.update_model_paths(model, model_paths)

    def share_model_across_processes(self) -> bool:
        if self._beams_own:
            return self._handler.share_model_across_processes()
        return False  # modelshare shares across processes itself, with local compute

    def model_copies(self) -> int:
        return self._handler.model_copies() if self._beams_own else 1

    # -- everything else is the wrapped handler's ---------------------------------------------

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        if self._pending_metrics is not None:
            self._report_load(*self._pending_metrics)
            self._pending_metrics = None
        if self._shared is not None:
            self._threads.apply(self._shared)
        _versions.prune()
        if isinstance(model, ModelRouter):
            return run_keyed(self._handler, model, batch, inference_args, self._run_batch)
        keyed = isinstance(self._handler, KeyedModelHandler) or (
            isinstance(self._handler, MaybeKeyedModelHandler) and bool(batch) and isinstance(batch[0], tuple))
        return self._run_batch(self._handler.run_inference, batch, model, inference_args, keyed)

    def _run_batch(self, run_inference: Callable[..., Iterable[Any]], batch: Sequence[Any], model: Any,
                   inference_args: Optional[dict[str, Any]], keyed: bool = False) -> Iterable[Any]:
        if self._batches is None:
            return run_inference(batch, model, inference_args)
        return self._batches.run(run_inference, batch, model, inference_args, keyed)

    def _count_call(self, size: int) -> None:
        Metrics.distribution(self.get_metrics_namespace(), "modelshare_call_size").update(size)

    def _report_load(self, info: HoldInfo, private_bytes: int) -> None:
        """Beam metrics: loads vs. attaches, their latency, bytes shared vs. private -- counters and
        distributions, which Beam adds up across workers (a gauge would keep one worker's value)."""
        namespace = self.get_metrics_namespace()
        kind = "load" if info.loaded_here else "attach"
        Metrics.counter(namespace, {"load": "modelshare_loads", "attach": "modelshare_attaches"}[kind]).inc()
        Metrics.distribution(namespace, f"modelshare_{kind}_latency_ms").update(int(info.seconds * 1000))
        Metrics.distribution(namespace, "modelshare_shared_bytes").update(info.shared_bytes)
        Metrics.distribution(namespace, "modelshare_private_bytes").update(private_bytes)
        if info.device_bytes:
            Metrics.distribution(namespace, "modelshare_gpu_bytes").update(info.device_bytes)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return self._handler.get_num_bytes(batch)

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()

    def get_resource_hints(self) -> dict[str, Any]:
        return self._handler.get_resource_hints()

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        """The wrapped handler's; with ``ragged=``, a window of the bundle to group before the model
        is called in batches of the handler's ``max_batch_size`` (``_batches.window_kwargs``)."""
        if self._batches is not None and self._batches.ragged is not None:
            return window_kwargs(self._handler.batch_elements_kwargs())
        return self._handler.batch_elements_kwargs()

    def validate_inference_args(self, inference_args: Optional[dict[str, Any]]) -> None:
        return self._handler.validate_inference_args(inference_args)

    def get_preprocess_fns(self) -> Iterable[Callable[[Any], Any]]:
        return self._handler.get_preprocess_fns()

    def get_postprocess_fns(self) -> Iterable[Callable[[Any], Any]]:
        return self._handler.get_postprocess_fns()

    def should_skip_batching(self) -> bool:
        return self._handler.should_skip_batching()

    def set_environment_vars(self) -> None:
        return self._handler.set_environment_vars()

    def override_metrics(self, metrics_namespace: str = "") -> bool:
        return self._handler.override_metrics(metrics_namespace)

    def should_garbage_collect_on_timeout(self) -> bool:
        return self._handler.should_garbage_collect_on_timeout()

