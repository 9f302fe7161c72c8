"""10,000 model versions where there were ten: listing, sweeping and admission stay right (their
timings, from one listing per decision, are in benchmarks/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.studies.directory_scale import populate
from modelshare import Budget, ModelRouter, SharedModel, gc_segments, list_segments

N = 10_000


def test_ten_thousand_versions_are_listed_swept_and_routed(shm_dir: Path) -> None:
    populate(shm_dir, N)
    removed = gc_segments(shm_dir)
    assert len(removed) == N and all(".seg.tmp-" in p.name for p in removed), "orphans gone, warm segments kept"
    infos = list_segments(shm_dir)
    assert len(infos) == N and all(i.state == "ready" and i.keep_warm for i in infos)
    size = infos[0].nbytes
    router = ModelRouter(factory=lambda k: SharedModel(lambda: {"w": np.ones(64, dtype=np.uint8)}, key=k,
                                                       directory=shm_dir),
                         budget=Budget(host=N * size), load_overhead=1.0)
    with router.use("new") as model:  # room made by evicting the least recently used, no more
        assert model["w"].sum() == 64
    del model
    held = [p.stat().st_size for p in shm_dir.glob("*.seg")]
    assert sum(held) <= N * size and N - 3 <= len(held) < N + 1, "the least used few evicted for it, within budget"
    assert gc_segments(shm_dir, include_warm=True) and not list(shm_dir.glob("*.seg"))
    for path in shm_dir.iterdir():  # lock files and the router's files
        path.unlink()
