"""Beam's own keyed multi-model path, for scenario 2: a real ``KeyedModelHandler`` over one
``ModelHandler`` per generated model, bounded by ``max_models_per_worker_hint`` (a count of models
per worker process). Imported only by the approach that uses it (it imports Apache Beam)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    KeyModelMapping,
    ModelHandler,
)

from ..frameworks import FRAMEWORKS

LOADS = {"loads": 0}  # models this process loaded


class GeneratedModelHandler(ModelHandler[Any, Any, Any]):
    """A custom Beam handler for one of the suite's generated model files."""

    def __init__(self, framework: str, path: str) -> None:
        super().__init__()
        self.framework, self.path = framework, path

    def load_model(self) -> Any:
        LOADS["loads"] += 1
        return FRAMEWORKS[self.framework].load(Path(self.path))

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[Any]:
        return [FRAMEWORKS[self.framework].call(model, x) for x in batch]


def keyed_handler(framework: str, paths: Sequence[str], hint: int) -> KeyedModelHandler:
    """``KeyedModelHandler([KeyModelMapping(["k<i>"], handler_i), ...], max_models_per_worker_hint=hint)``."""
    handler = KeyedModelHandler([KeyModelMapping([f"k{i}"], GeneratedModelHandler(framework, p))
                                 for i, p in enumerate(paths)], max_models_per_worker_hint=hint)
    handler.override_metrics("modelshare-bench")  # what RunInference does before the first batch
    return handler
