"""What the server examples share: the model, its SharedModel, and one request's answer.

The model is generated (``benchmarks.models.numpy_mlp``, ``$EXAMPLE_MODEL_MIB`` MiB, 32 by
default), so the examples run anywhere. ``$EXAMPLE_HOLD=1`` holds the model for the life of the
worker (acquired at import, so ``gunicorn --preload`` workers inherit it); otherwise each request
calls ``use()`` -- the request-handler pattern, which the linger keeps from reloading.
``$EXAMPLE_PRIVATE=1``: no sharing, each process loads its own copy at import (the baseline).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np

from benchmarks.models import numpy_mlp
from modelshare import SharedModel

WIDTH = 512
load = functools.partial(numpy_mlp, int(os.environ.get("EXAMPLE_MODEL_MIB", "32")), WIDTH)
shared = SharedModel(load, key="example-mlp")
if os.environ.get("EXAMPLE_PRIVATE") == "1":  # the usual way, for comparison: every process loads its own
    held = load()
else:
    held = shared.acquire() if os.environ.get("EXAMPLE_HOLD") == "1" else None


def request_input(seed: int) -> np.ndarray:
    """The input of request ``seed``: the same in every process, so answers can be checked."""
    return np.random.default_rng(seed).random((1, WIDTH), dtype=np.float32)


def answer(seed: int) -> bytes:
    """One request: the model's output summed, with the pid that computed it, as JSON."""
    if held is not None:
        output = held(request_input(seed))
    else:
        with shared.use() as model:  # per request: cheap while the hold lingers
            output = model(request_input(seed))
    return json.dumps({"pid": os.getpid(), "output": float(output.sum())}).encode()


def seed_of(query: str) -> int:
    """``seed=N`` from a query string (0 if absent)."""
    fields: dict[str, Any] = dict(part.partition("=")[::2] for part in query.split("&") if part)
    return int(fields.get("seed", 0))
