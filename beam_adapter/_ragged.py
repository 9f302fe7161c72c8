"""Ragged inputs: elements of different shapes in one batch, without "stack expects each tensor to be
equal size".

Framework-agnostic (numpy arrays and torch tensors; torch is never imported here):

* ``group_by_shape(items, max_size)``: indices grouped by shape (and dtype; a dict of arrays by the
  shapes of its values), so each group stacks; every element is computed exactly as in a batch of
  its own shape.
* ``group_for_padding(items, max_waste, max_size)``: indices grouped by size so that padding each
  group to its largest shape adds at most ``max_waste`` of the values it really holds -- length
  buckets that bound the wasted compute, whatever the lengths.
* ``pad(items, value)``: pad every element to the group's largest size in each dimension, and say
  which positions are real with a boolean mask over the *sequence* dimensions -- the leading ones,
  up to the last that differs in the group: ``(L,)`` for ``(L, 16)`` embeddings or ``(L,)`` token
  ids, stacked to the ``(B, L)`` a Hugging Face-style ``attention_mask`` is -- or, with
  ``full_mask=True``, of the element's whole padded shape.
* ``crop(output, original, padded)``: a per-position output cut back to its element's lengths,
  along the padded dimensions only, and only where the output keeps the input's rank (a pooled
  output whose width happens to equal the padded length is left alone).

Example::

    groups = group_by_shape([a3, b5, c3])        # [[0, 2], [1]]
    padded, masks = pad([a3, b5, c3], value=0)   # all of shape (5,), masks[0] = [T, T, T, F, F]
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np

__all__ = ["group_by_shape", "group_for_padding", "pad", "crop", "ragged_dims", "has_shape"]


def _shape(item: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in item.shape)


def has_shape(item: Any) -> bool:
    """Whether ``item`` is an array or tensor, or a dict of them (what ``group_by_shape`` groups)."""
    if isinstance(item, Mapping):
        return bool(item) and all(hasattr(value, "shape") for value in item.values())
    return hasattr(item, "shape") and hasattr(item, "dtype")


def _signature(item: Any) -> Hashable:
    if isinstance(item, Mapping):
        return tuple(sorted((str(k), _shape(v), str(v.dtype)) for k, v in item.items()))
    return _shape(item), str(item.dtype)


def _overflows(count: int, size: int, max_size: Optional[int], max_count: Optional[int]) -> bool:
    return (max_size is not None and size > max_size) or (max_count is not None and count > max_count)


def _chunks(indices: list[int], max_size: Optional[int], sizes: Optional[Sequence[int]],
            max_count: Optional[int]) -> list[list[int]]:
    """``indices`` cut in order into pieces whose sizes (``sizes[i]``, else 1 each) add up to at
    most ``max_size``, of at most ``max_count`` items (an item too big alone is a piece of its own)."""
    pieces: list[list[int]] = []
    total = 0
    for index in indices:
        size = sizes[index] if sizes is not None else 1
        if not pieces or _overflows(len(pieces[-1]) + 1, total + size, max_size, max_count):
            pieces.append([])
            total = 0
        pieces[-1].append(index)
        total += size
    return pieces


def group_by_shape(items: Sequence[Any], max_size: Optional[int] = None, sizes: Optional[Sequence[int]] = None,
                   max_count: Optional[int] = None) -> list[list[int]]:
    """Indices of ``items`` grouped by shape and dtype (order kept within a group; groups in order
    of first appearance), each group cut into pieces of at most ``max_size`` -- elements, or the
    sum of ``sizes`` (what Beam's ``element_size_fn`` says of each item) where given -- and of at
    most ``max_count`` elements."""
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(_signature(item), []).append(index)
    return [piece for group in groups.values() for piece in _chunks(group, max_size, sizes, max_count)]


def group_for_padding(items: Sequence[Any], max_waste: Optional[float], max_size: Optional[int] = None,
                      sizes: Optional[Sequence[int]] = None, max_count: Optional[int] = None) -> list[list[int]]:
    """Indices of ``items`` (arrays or tensors) in groups to pad together: of one rank and dtype, by
    increasing size, a group closed before padding it to its largest shape would compute more than
    ``1 + max_waste`` times the values its elements hold (``None``: no bound), or before it holds
    more than ``max_size`` elements (or sum of ``sizes``) or ``max_count`` elements. Each group's
    padding overhead is at most ``max_waste``."""
    kinds: dict[tuple[int, str], list[int]] = {}
    for index, item in enumerate(items):
        kinds.setdefault((len(_shape(item)), str(item.dtype)), []).append(index)
    groups = []
    for indices in kinds.values():
        indices.sort(key=lambda i: (math.prod(_shape(items[i])), _shape(items[i])))
        group: list[int] = []
        target: tuple[int, ...] = ()
        real = taken = 0
        for index in indices:
            shape, size = _shape(items[index]), sizes[index] if sizes is not None else 1
            grown = tuple(map(max, target, shape)) if group else shape
            holds = real + math.prod(shape)
            full = _overflows(len(group) + 1, taken + size, max_size, max_count)
            wasteful = max_waste is not None and (len(group) + 1) * math.prod(grown) > (1 + max_waste) * holds
            if group and (full or wasteful):
                groups.append(group)
                group, grown, holds, taken = [], shape, math.prod(shape), 0
            group.append(index)
            target, real, taken = grown, holds, taken + size
        groups.append(group)
    return groups


def pad(items: Sequence[Any], value: Any = 0, full_mask: bool = False) -> tuple[list[Any], list[Any]]:
    """Each item padded (at the end of each dimension) to the largest size; and its mask (over the
    sequence dimensions, or the whole shape with ``full_mask``).

    Items must have the same number of dimensions and dtype. Returns items of the input's kind
    (numpy arrays or torch tensors, on the item's device) and boolean masks of the same kind.
    """
    if not items:
        return [], []
    ndims = {len(_shape(item)) for item in items}
    if len(ndims) != 1:
        raise ValueError(f"cannot pad elements with different numbers of dimensions {sorted(ndims)}; "
                         "reshape them first, or use ragged='bucket' to group them by shape")
    target = tuple(max(sizes) for sizes in zip(*(_shape(item) for item in items)))
    ragged = ragged_dims(items)
    mask_dims = len(target) if full_mask else (ragged[-1] + 1 if ragged else 1)
    padded, masks = [], []
    for item in items:
        region = tuple(slice(0, d) for d in _shape(item))
        if type(item).__module__.startswith("torch"):
            import torch

            out = torch.full(target, value, dtype=item.dtype, device=item.device)
            mask = torch.zeros(target[:mask_dims], dtype=torch.bool, device=item.device)
        else:
            out = np.full(target, value, dtype=item.dtype)
            mask = np.zeros(target[:mask_dims], dtype=bool)
        out[region] = item
        mask[region[:mask_dims]] = True
        padded.append(out)
        masks.append(mask)
    return padded, masks


def ragged_dims(items: Sequence[Any]) -> list[int]:
    """The dimensions whose sizes differ among ``items`` (those padding grows)."""
    shapes = [_shape(item) for item in items]
    return [dim for dim, sizes in enumerate(zip(*shapes)) if len(set(sizes)) > 1]


def crop(output: Any, original: tuple[int, ...], padded: tuple[int, ...]) -> Any:
    """``output`` cut back to ``original`` along the dimensions padding grew -- where it kept the
    padded size, and only if the output has at least the input's rank (and two dimensions for a
    rank-1 input: per-token scores over a vocabulary), as a per-position output does; a pooled
    output is never cut, even where its width equals the padded length."""
    shape = _shape(output) if hasattr(output, "shape") else ()
    if len(shape) < max(len(original), 2):
        return output
    index = tuple(slice(0, size) if size != grown and shape[dim] == grown else slice(None)
                  for dim, (size, grown) in enumerate(zip(original, padded)))
    return output[index] if index else output
