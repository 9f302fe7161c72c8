"""How a batch reaches the wrapped handler: ragged elements made stackable, and batches that run
out of memory split instead of failing.

* **Ragged** (``ragged=``): ``"bucket"`` runs each group of equally shaped elements as its own
  call; ``"pad"`` (or ``Pad(...)``) pads every element to the batch's largest shape, optionally
  hands the model the mask as a keyword inference argument (``(B, L)``, as attention masks are,
  or the full shape on request), and crops per-position outputs back to each element's own
  shape -- never a pooled output whose size merely equals the padded length. Results come back
  in the batch's order, each with its original example.
* **Out of memory**: a call that fails for memory -- ``MemoryError``, torch's
  ``OutOfMemoryError`` (CUDA), its CPU allocator's "can't allocate memory", ONNX Runtime's
  failed allocations, any "out of memory" -- is retried on the two halves of its batch, down to
  single elements; the size that worked becomes a cap, and later batches are cut to it before
  they are tried. After ``PROBE_AFTER`` batches in a row succeed at the cap it is doubled (and
  lifted once it exceeds every batch seen), so one transient OOM does not shrink the rest of the
  run. Beam's own batching grows batches until they fail; here the worker and its elements
  survive, and what still fails (a single element) fails as before, counted by Beam's
  ``failed_batches_counter``.
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ._ragged import crop, group_by_shape, pad

_log = logging.getLogger(__name__)

RunInference = Callable[[Sequence[Any], Any, Optional[dict[str, Any]]], Iterable[Any]]


@dataclass(frozen=True)
class Pad:
    """Pad ragged elements to the batch's largest shape.

    ``value`` fills the padding; ``mask_arg``, if set, is the keyword under which the model gets
    the stacked boolean mask (True = real data), e.g. ``"attention_mask"``: ``(B, L)`` over the
    sequence dimensions by default, the elements' whole padded shape with ``full_mask=True``;
    ``crop`` cuts per-position outputs back to each element's own length (``_ragged.crop``).
    """

    value: Any = 0
    mask_arg: Optional[str] = None
    crop: bool = True
    full_mask: bool = False


Ragged = Union[None, str, Pad]


def ragged_policy(ragged: Ragged) -> Union[None, str, Pad]:
    """Check ``ragged=`` and normalise ``"pad"`` to ``Pad()``."""
    if ragged is None or ragged == "bucket" or isinstance(ragged, Pad):
        return ragged
    if ragged == "pad":
        return Pad()
    raise ValueError(f"ragged must be None, 'bucket', 'pad' or a Pad(...), not {ragged!r}")


#: what allocators say when they fail, lower-cased: CUDA and generic ("out of memory"), torch's CPU
#: allocator ("DefaultCPUAllocator: can't allocate memory"), errno 12 ("Cannot allocate memory"),
#: ONNX Runtime ("Failed to allocate memory", "bad_alloc")
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory",
                 "bad_alloc")

#: successful batches in a row at the cap before it is doubled
PROBE_AFTER = 4


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (on any allocator a user meets on CPU or GPU)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    message = str(exc).lower()
    return any(text in message for text in _OOM_MESSAGES)


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class BatchRunner:
    """Calls the wrapped handler's ``run_inference`` on ragged-safe, memory-bounded pieces."""

    def __init__(self, ragged: Ragged = None) -> None:
        self.ragged = ragged_policy(ragged)
        self.cap: Optional[int] = None  # the largest batch known to fit, once one did not
        self._fits_in_a_row = 0  # successful calls at the cap since it was set or raised
        self._largest = 0  # the largest batch asked for

    def run(self, call: RunInference, batch: Sequence[Any], model: Any,
            inference_args: Optional[dict[str, Any]]) -> list[Any]:
        batch = list(batch)
        if isinstance(self.ragged, Pad) and batch and hasattr(batch[0], "shape"):
            return self._padded(call, batch, model, inference_args)
        if self.ragged == "bucket" and batch and hasattr(batch[0], "shape"):
            results: list[Any] = [None] * len(batch)
            for group in group_by_shape(batch):
                for index, result in zip(group, self._bounded(call, [batch[i] for i in group], model, inference_args)):
                    results[index] = result
            return results
        return self._bounded(call, batch, model, inference_args)

    def _padded(self, call: RunInference, batch: list[Any], model: Any,
                inference_args: Optional[dict[str, Any]]) -> list[Any]:
        policy = self.ragged
        assert isinstance(policy, Pad)
        padded, masks = pad(batch, policy.value, policy.full_mask)
        results = self._bounded(call, padded, model, inference_args, masks if policy.mask_arg else None)
        fixed = []
        for original, grown, result in zip(batch, padded, results):
            inference = result.inference
            if policy.crop:
                inference = crop(inference, tuple(original.shape), tuple(grown.shape))
            fixed.append(result._replace(example=original, inference=inference)
                         if hasattr(result, "_replace") else result)
        return fixed

    def _bounded(self, call: RunInference, batch: list[Any], model: Any, inference_args: Optional[dict[str, Any]],
                 masks: Optional[list[Any]] = None) -> list[Any]:
        self._largest = max(self._largest, len(batch))
        if self.cap is not None and len(batch) > self.cap:
            step = self.cap
            return [result for start in range(0, len(batch), step)
                    for result in self._bounded(call, batch[start:start + step], model, inference_args,
                                                masks[start:start + step] if masks else None)]
        args = inference_args
        if masks is not None:  # the mask must match the piece actually run
            args = dict(inference_args or {}, **{self.ragged.mask_arg: _stack(masks)})  # type: ignore[union-attr]
        try:
            results = list(call(batch, model, args))
        except Exception as exc:
            if not is_out_of_memory(exc) or len(batch) == 1:
                raise
        else:
            self._probe(len(batch))
            return results
        half = len(batch) // 2
        self.cap = half if self.cap is None else min(self.cap, half)
        self._fits_in_a_row = 0
        _log.warning("a batch of %d ran out of memory; splitting it, and capping batches at %d", len(batch), self.cap)
        _free_memory()
        return (self._bounded(call, batch[:half], model, inference_args, masks[:half] if masks else None)
                + self._bounded(call, batch[half:], model, inference_args, masks[half:] if masks else None))


    def _probe(self, size: int) -> None:
        """After ``PROBE_AFTER`` batches in a row fit at the cap, try twice the cap (and no cap
        once it exceeds every batch seen): memory that ran out once may be back."""
        if self.cap is None or size < self.cap:
            return
        self._fits_in_a_row += 1
        if self._fits_in_a_row < PROBE_AFTER:
            return
        self._fits_in_a_row = 0
        self.cap = None if self.cap * 2 >= self._largest else self.cap * 2
        _log.info("%d batches in a row fitted: batches capped at %s now", PROBE_AFTER, self.cap or "no size")


def _stack(items: list[Any]) -> Any:
    if items and type(items[0]).__module__.startswith("torch"):
        import torch

        return torch.stack(items)
    import numpy as np

    return np.stack(items)
