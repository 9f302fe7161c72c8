"""How a batch reaches the wrapped handler: ragged elements grouped before they are batched, and
batches that run out of memory split instead of failing.

* **Ragged** (``ragged=``): Beam forms batches in arrival order, so with varied lengths a batch
  holds many shapes and grouping inside it makes a call per element or two. With ``ragged=``,
  ``window_kwargs`` has Beam's ``BatchElements`` hand ``run_inference`` a *window* instead --
  the bundle's elements, up to ``WINDOW_BYTES`` of inputs or ``WINDOW_ELEMENTS`` elements, on every
  runner (no state, no timers) -- and the model is called on groups formed over the whole window,
  each at most the handler's ``max_batch_size``: ``"bucket"`` makes one call per distinct shape
  (a dict of tensors by the shapes of its values); ``"pad"`` (or ``Pad(...)``) sorts elements by
  size into groups whose padding adds at most ``Pad.max_waste`` of the values they hold, pads each
  group to its largest shape, optionally hands the model the mask as a keyword inference argument
  (``(B, L)``, as attention masks are, or the full shape on request), and crops per-position
  outputs back to each element's own shape -- never a pooled output whose size merely equals the
  padded length. Results come back in the window's order, each with its original example; keyed
  elements (``(key, example)``) are grouped by their examples.
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

import functools
import gc
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from ._ragged import crop, group_by_shape, group_for_padding, has_shape, pad

_log = logging.getLogger(__name__)

RunInference = Callable[[Sequence[Any], Any, Optional[dict[str, Any]]], Iterable[Any]]


@dataclass(frozen=True)
class Pad:
    """Pad ragged elements, in groups of similar size, to their group's largest shape.

    ``value`` fills the padding; ``mask_arg``, if set, is the keyword under which the model gets
    the stacked boolean mask (True = real data), e.g. ``"attention_mask"``: ``(B, L)`` over the
    sequence dimensions by default, the elements' whole padded shape with ``full_mask=True``;
    ``crop`` cuts per-position outputs back to each element's own length (``_ragged.crop``);
    ``max_waste`` bounds the compute padding adds to a call, as a fraction of the values its
    elements hold (0.25: at most a quarter more; ``None``: one shape per call, fewest calls).
    """

    value: Any = 0
    mask_arg: Optional[str] = None
    crop: bool = True
    full_mask: bool = False
    max_waste: Optional[float] = 0.25

    def __post_init__(self) -> None:
        if self.max_waste is not None and not self.max_waste >= 0:
            raise ValueError(f"Pad(max_waste=...) is the padding a call may add, a fraction >= 0 (or None for "
                             f"no bound), not {self.max_waste!r}")


Ragged = Union[None, str, Pad]


def ragged_policy(ragged: Ragged) -> Union[None, str, Pad]:
    """Check ``ragged=`` and normalise ``"pad"`` to ``Pad()``."""
    if ragged is None or ragged == "bucket" or isinstance(ragged, Pad):
        return ragged
    if ragged == "pad":
        return Pad()
    raise ValueError(f"ragged must be None, 'bucket', 'pad' or a Pad(...), not {ragged!r}")


#: the most a ragged window holds: bytes of inputs, and elements (or the handler's max_batch_size)
WINDOW_BYTES = 64 << 20
WINDOW_ELEMENTS = 4096

def window_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``BatchElements`` arguments that hand ``run_inference`` a window -- the bundle's elements up
    to ``WINDOW_BYTES`` of inputs or ``WINDOW_ELEMENTS`` (or ``max_batch_size``) elements -- for
    ``BatchRunner`` to group by shape before it calls the model. Never Beam's stateful batching
    (``max_batch_duration_secs``, length buckets): a window is a bundle's, which needs no state,
    and Beam 2.77's stateful batching fails on the default DirectRunner (an ``AssertionError`` in
    its GroupByKey evaluator)."""
    elements = max(WINDOW_ELEMENTS, int(kwargs.get("max_batch_size") or 0))
    return dict(min_batch_size=WINDOW_BYTES, max_batch_size=WINDOW_BYTES,
                element_size_fn=functools.partial(_window_share, floor=WINDOW_BYTES // elements))


def _window_share(element: Any, floor: int) -> int:
    """What an element takes of a window: its bytes, at least ``floor`` (so a window holds at
    most so many elements), at most the whole window (so one huge element is a window of its own)."""
    return min(WINDOW_BYTES, max(floor, _nbytes(element)))


def _nbytes(value: Any) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    if isinstance(value, Mapping):
        return sum(_nbytes(item) for item in value.values())
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch tensors
        return int(value.element_size() * value.nelement())
    return 0


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
    """Calls the wrapped handler's ``run_inference`` on ragged-safe, memory-bounded pieces.

    What one call gets at most, from the handler's batching arguments as Beam reads them:
    ``max_batch`` elements -- or, with ``size_fn`` (its ``element_size_fn``,
    applied to the elements ``run_inference`` gets), that much weight -- and with ``max_weight``
    (its ``max_batch_weight``) that much weight besides ``max_batch`` elements. ``on_call``: told
    the size of each call made (the ``modelshare_call_size`` metric).
    """

    def __init__(self, ragged: Ragged = None, max_batch: Optional[int] = None,
                 on_call: Optional[Callable[[int], None]] = None,
                 size_fn: Optional[Callable[[Any], int]] = None, max_weight: Optional[int] = None) -> None:
        self.ragged = ragged_policy(ragged)
        self.on_call = on_call
        self.size_fn = size_fn
        if max_weight is not None and size_fn is None:
            raise ValueError("max_batch_weight needs an element_size_fn that weighs each element")
        # one call's bounds: (sum of sizes -- elements without size_fn --, elements)
        self._limits = (max_weight, max_batch) if max_weight is not None else (max_batch, None)
        self.cap: Optional[int] = None  # the largest batch known to fit, once one did not
        self._fits_in_a_row = 0  # successful calls at the cap since it was set or raised
        self._largest = 0  # the largest batch asked for

    def run(self, call: RunInference, batch: Sequence[Any], model: Any,
            inference_args: Optional[dict[str, Any]], keyed: bool = False) -> list[Any]:
        """``call``'s results for ``batch``, in its order: grouped (``ragged=``) and split as needed.
        ``keyed``: the elements are ``(key, example)`` pairs (a ``KeyedModelHandler``'s)."""
        batch = list(batch)
        if self.ragged is None or not batch:
            return self._bounded(call, batch, model, inference_args)
        examples = [item[1] for item in batch] if keyed else batch
        unshaped = next((e for e in examples if not has_shape(e)), None)
        if unshaped is not None or (isinstance(self.ragged, Pad) and isinstance(examples[0], Mapping)):
            raise TypeError(
                f"ragged={self.ragged!r} groups numpy arrays and torch tensors ('bucket': dicts of them too), "
                f"not {type(unshaped if unshaped is not None else examples[0]).__qualname__}: give such "
                "elements a shape in a preprocess function, or leave ragged= out")
        sizes = [int(self.size_fn(item)) for item in batch] if self.size_fn is not None else None
        max_size, max_count = self._limits
        if isinstance(self.ragged, Pad):
            groups = group_for_padding(examples, self.ragged.max_waste, max_size, sizes, max_count)
        else:
            groups = group_by_shape(examples, max_size, sizes, max_count)
        results: list[Any] = [None] * len(batch)
        for group in groups:
            pieces = [batch[i] for i in group]
            if isinstance(self.ragged, Pad):
                done = self._padded(call, pieces, model, inference_args, keyed)
            else:
                done = self._bounded(call, pieces, model, inference_args)
            for index, result in zip(group, done):
                results[index] = result
        return results

    def _padded(self, call: RunInference, batch: list[Any], model: Any,
                inference_args: Optional[dict[str, Any]], keyed: bool) -> list[Any]:
        policy = self.ragged
        assert isinstance(policy, Pad)
        examples = [item[1] for item in batch] if keyed else batch
        padded, masks = pad(examples, policy.value, policy.full_mask)
        items = [(item[0], grown) for item, grown in zip(batch, padded)] if keyed else padded
        results = self._bounded(call, items, model, inference_args, masks if policy.mask_arg else None)
        return [_restore(result, original, grown, policy.crop, keyed)
                for original, grown, result in zip(examples, padded, results)]

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
        if self.on_call is not None:
            self.on_call(len(batch))
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


def _restore(result: Any, original: Any, grown: Any, cropping: bool, keyed: bool) -> Any:
    """A padded element's result as its own: its original example, and (``cropping``) the
    per-position output cut back to its shape; ``keyed``: inside its ``(key, result)`` pair."""
    if keyed:
        key, result = result
        return key, _restore(result, original, grown, cropping, False)
    if not hasattr(result, "_replace"):
        return result
    inference = crop(result.inference, tuple(original.shape), tuple(grown.shape)) if cropping else result.inference
    return result._replace(example=original, inference=inference)


def _stack(items: list[Any]) -> Any:
    if items and type(items[0]).__module__.startswith("torch"):
        import torch

        return torch.stack(items)
    import numpy as np

    return np.stack(items)
