"""Prometheus metrics for a segment directory: what is shared now, and what happened.

    from prometheus_client import REGISTRY, start_http_server
    from modelshare.metrics import ModelShareCollector

    REGISTRY.register(ModelShareCollector())      # the default directory; or directory=...
    start_http_server(9100)

Every figure is machine-wide, read from the directory when Prometheus scrapes: any worker may
serve ``/metrics`` and they all say the same (``modelshare top`` prints the same figures):

* ``modelshare_segment_bytes{key,version}``: bytes of each model version's segment;
* ``modelshare_segment_holders{key}``: processes holding the key's segments now;
* ``modelshare_orphaned_segments``: complete segments whose holders all died (adopted or gc'd);
* ``modelshare_loads_total{key}``, ``modelshare_attaches_total{key}``: loader runs that published
  a segment, and processes that attached to one (``share="processes"``);
* ``modelshare_evictions_total{key}``: models a router's budget evicted to make room;
* ``modelshare_budget_bytes{memory}``: the byte budget routers declared (``host``, ``cuda:N``).

Needs ``prometheus_client`` (``pip install "modelshare[metrics]"``) for the collector only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from ._host import counts
from ._host.directory import default_directory
from ._host.inventory import list_segments

__all__ = ["Figures", "SegmentFigure", "figures", "ModelShareCollector"]


@dataclass(frozen=True)
class SegmentFigure:
    """One model version's segment: its key, version, size, holders and state (``ready``, ``orphaned``...)."""

    key: str
    version: str
    nbytes: int
    holders: int
    state: str


@dataclass(frozen=True)
class Figures:
    """A directory's figures at one moment: segments now, counts so far, budgets declared."""

    segments: list[SegmentFigure] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # key -> {"loads": n, ...}
    budgets: dict[str, int] = field(default_factory=dict)  # "host" / "cuda:N" -> bytes

    def count(self, key: str, event: str) -> int:
        """How many ``event``s (``loads``, ``attaches``, ``evictions``) model ``key`` has had."""
        return int(self.counts.get(key, {}).get(event, 0))

    def keys(self) -> list[str]:
        """Every key with a segment now or a count so far."""
        return sorted({s.key for s in self.segments} | set(self.counts))


def figures(directory: Union[str, "os.PathLike[str]", None] = None) -> Figures:
    """The figures of ``directory`` (default ``$MODELSHARE_DIR`` or ``/dev/shm/modelshare-<uid>``)."""
    path = Path(directory) if directory is not None else default_directory()
    if not path.is_dir():
        return Figures()
    segments = [SegmentFigure(i.key, i.version or i.version_hash, i.nbytes, len(i.holders), i.state)
                for i in list_segments(path)]
    state = counts.read(path)
    per_key = {key: {e: int(n) for e, n in events.items() if isinstance(n, int)}
               for key, events in state["keys"].items() if isinstance(events, dict)}
    budgets = {memory: int(b) for memory, b in state["budgets"].items() if isinstance(b, int)}
    return Figures(segments, per_key, budgets)


class ModelShareCollector:
    """A ``prometheus_client`` collector of a segment directory's figures (see the module docstring)."""

    def __init__(self, directory: Union[str, "os.PathLike[str]", None] = None) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            raise ImportError('modelshare.metrics.ModelShareCollector needs prometheus_client: '
                              'pip install "modelshare[metrics]"') from None
        self.directory: Optional[Path] = None if directory is None else Path(directory)

    def describe(self) -> list[Any]:
        """No description ahead of a scrape: the families depend on what the directory holds."""
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = figures(self.directory)
        size = GaugeMetricFamily("modelshare_segment_bytes", "Bytes of each model version's shared segment",
                                 labels=["key", "version"])
        holders = GaugeMetricFamily("modelshare_segment_holders", "Processes holding the key's segments now",
                                    labels=["key"])
        per_key_holders: dict[str, int] = {}
        for segment in now.segments:
            size.add_metric([segment.key, segment.version], segment.nbytes)
            per_key_holders[segment.key] = per_key_holders.get(segment.key, 0) + segment.holders
        for key, n in sorted(per_key_holders.items()):
            holders.add_metric([key], n)
        orphaned = GaugeMetricFamily("modelshare_orphaned_segments",
                                     "Complete segments whose holders all died (adopted by the next acquire)",
                                     value=sum(s.state == "orphaned" for s in now.segments))
        yield from (size, holders, orphaned)
        helps = {"loads": "Loader runs that published a segment", "attaches": "Processes that attached to a segment",
                 "evictions": "Models a router's budget evicted to make room"}
        for event in counts.EVENTS:
            family = CounterMetricFamily(f"modelshare_{event}", helps[event], labels=["key"])
            for key in now.keys():
                family.add_metric([key], now.count(key, event))
            yield family
        budget = GaugeMetricFamily("modelshare_budget_bytes", "The byte budget routers declared", labels=["memory"])
        for memory, nbytes in sorted(now.budgets.items()):
            budget.add_metric([memory], nbytes)
        yield budget
