"""The memory scenarios of the suite, one module each, registered by number.

A scenario says which approaches run side by side, how many threads each worker process runs,
and the default memory limit: one that the private approach cannot fit and a shared copy can.
A new scenario is a new module here (and, if it needs them, new approaches in
``benchmarks.suite.approaches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...models import MiB


def headroom(model_bytes: int) -> int:
    """Slack on top of what the shared approaches need: a quarter of the model, at least 128 MiB
    (a bare worker's size varies by some MiB between runs, and loads have transients)."""
    return max(model_bytes // 4, 128 * MiB)


@dataclass(frozen=True)
class Scenario:
    """One memory scenario: what runs, with how many threads, under what limit."""

    number: int
    title: str
    approaches: tuple[str, ...]
    threads: int  # threads per worker process, by default
    # the default limit in bytes: f(model bytes, processes, threads, a bare worker's bytes)
    default_limit: Callable[[int, int, int, int], int]
    must_survive: tuple[str, ...]  # the approaches the limit is sized for
    copies: int = 1  # model instances on the machine, for the approaches with exact copies
    keyed_models: int = 1  # keyed scenarios: how many models
    held_models: int = 1  # keyed scenarios: how many of them fit at once (Beam's hint, the router's budget)


def _scenarios() -> dict[int, Scenario]:
    from . import exact_copies, keyed_models, one_large_model, one_model_per_process

    modules = (one_model_per_process, keyed_models, one_large_model, exact_copies)
    return {module.SCENARIO.number: module.SCENARIO for module in modules}


def get(number: int) -> Scenario:
    """Scenario ``number``; a clear error names the ones there are."""
    scenarios = _scenarios()
    if number not in scenarios:
        raise ValueError(f"no scenario {number}: the suite has scenarios {sorted(scenarios)}")
    return scenarios[number]


def numbers() -> list[int]:
    return sorted(_scenarios())
