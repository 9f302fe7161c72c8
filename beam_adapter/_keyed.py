"""Keyed models under a byte budget: a Beam ``KeyedModelHandler([KeyModelMapping(...), ...])``
routed through a ``modelshare.ModelRouter`` instead of Beam's per-process model count.

Beam bounds a multi-model keyed handler by ``max_models_per_worker_hint`` -- a number of models
per process, whatever their sizes, multiplied by the number of processes. Here every model is
a ``SharedModel`` in one directory and the router keeps the bytes held by all of them on the
machine within ``budget``: the least recently used model no process is using is evicted to make
room, and a model in use is never evicted. Inference is the wrapped handler's: the batch is
grouped by key as ``KeyedModelHandler`` groups it, and each group runs through its own model
handler's ``run_inference``, so the keyed results are the same as unwrapped. Models of PyTorch
handlers built for the GPU get one copy on it each (``_devices``), under ``Budget(gpu=...)``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler

from modelshare import Budget, ModelRouter, Processes, SharedModel, loader_fingerprint, make_key

from ._devices import fall_back_to_cpu, handler_device, usable_device
from ._loaders import cpu_loader, lean_loader

__all__ = ["is_multi_model", "keyed_router", "run_keyed"]


def is_multi_model(handler: ModelHandler) -> bool:
    """Whether ``handler`` is a ``KeyedModelHandler`` over several models (``KeyModelMapping``s)."""
    return isinstance(handler, KeyedModelHandler) and not handler._single_model


def keyed_router(handler: KeyedModelHandler, budget: Budget, directory: Optional[str]) -> ModelRouter:
    """A router over the models of ``handler``'s mappings, one ``SharedModel`` per mapping."""
    models, lean = {}, True
    for model_id, mh in handler._id_to_mh_map.items():
        key = make_key(f"beam-keyed-{model_id}", "beam-keyed-model")
        fall_back_to_cpu(mh)
        device = usable_device(mh, handler_device(mh, None), False, key)  # a PyTorch handler built for the GPU
        loader = lean_loader(mh, on_cpu=device is not None)
        lean = lean and loader is not None
        if loader is None:
            loader = cpu_loader(mh) if device is not None else mh.load_model
        models[model_id] = SharedModel(loader, key=key, version=loader_fingerprint(mh.load_model),
                                       directory=directory, share=Processes(device=device))
    # a load holds the handler's private copy beside the segment (measured), unless every loader maps its file
    return ModelRouter(models, budget=budget, load_overhead=1.0 if lean else None)


def run_keyed(handler: KeyedModelHandler, router: ModelRouter, batch: Sequence[tuple[Any, Any]],
              inference_args: Optional[dict[str, Any]],
              run: Callable[..., Iterable[Any]]) -> list[tuple[Any, Any]]:
    """``KeyedModelHandler.run_inference`` with each model taken from ``router`` for its group,
    and the handler's metrics -- per model (``<id>-num_inferences``, ...) and in aggregate --
    updated as it updates them (a model's load metrics where this call loaded it: its load time,
    and its size in the segment).

    ``run(mh.run_inference, examples, model, inference_args)`` runs one group (the adapter's
    ragged/out-of-memory batching, or a plain call).
    """
    batch_by_key: dict[Any, list[Any]] = defaultdict(list)
    keys_by_id: dict[str, dict[Any, None]] = defaultdict(dict)
    for key, example in batch:
        batch_by_key[key].append(example)
        keys_by_id[handler._key_to_id_map[key]][key] = None
    predictions = []
    for model_id, keys in keys_by_id.items():
        mh = handler._id_to_mh_map[model_id]
        collectors = _collectors(handler, model_id)
        brought_in = router.model(model_id).hold_info() is None
        shared, model = router.acquire(model_id)
        info = shared.hold_info()
        if brought_in and info is not None and info.loaded_here:  # Beam counts loads, once per machine
            for collector in collectors:
                collector.update_load_model_metrics(int(info.seconds * 1000), info.shared_bytes)
        start = time.time_ns() // 1000
        num_bytes = num_elements = 0
        try:
            for key in keys:
                examples = batch_by_key[key]
                try:
                    predictions += [(key, p) for p in run(mh.run_inference, examples, model, inference_args)]
                except BaseException:
                    for collector in collectors:
                        collector.failed_batches_counter.inc()
                    raise
                num_bytes += mh.get_num_bytes(examples)
                num_elements += len(examples)
        finally:
            shared.release(model)
            del model  # before the next model is admitted: an evicted segment is freed once nothing maps it
        for collector in collectors:
            collector.update(num_elements, num_bytes, time.time_ns() // 1000 - start)
    return predictions


def _collectors(handler: KeyedModelHandler, model_id: str) -> list[Any]:
    """The handler's metrics collectors for ``model_id`` and for all models (Beam makes them in
    ``override_metrics``, which RunInference calls before any batch)."""
    own = getattr(handler, "_metrics_collectors", {}).get(model_id)
    return [c for c in (own, getattr(handler, "_default_metrics_collector", None)) if c is not None]
