"""The budget is a hard bound: exact sizes admitted before anything is written, underestimates
that wait instead of overshooting, keys with no estimate, a ledger rebuilt from the segments,
and held bytes sampled every 2 ms under a SIGKILL storm of loaders, holders and router users."""

from __future__ import annotations

import functools
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from benchmarks.studies.budget_storm import BUDGET, Sampler, Storm, held_bytes
from modelshare import Budget, MemoryBudgetExceeded, ModelRouter, SharedModel, gc_segments
from modelshare._router.ledger import LEDGER
from modelshare.memory import Peak

from ..support.workers import MiB, blob, counted_blob, loads_counted
from .test_router import _clear


def test_a_model_larger_than_the_whole_budget_is_never_published(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    router = ModelRouter(factory=lambda k: SharedModel(functools.partial(counted_blob, counter, 8), key=k,
                                                       directory=shm_dir), budget=Budget(host="6MiB"), wait=0)
    with Peak(lambda: held_bytes(shm_dir), every=0.002) as peak:
        for _ in range(2):
            with pytest.raises(MemoryBudgetExceeded, match=r"model 'big' needs 8\.0 MiB, more than the whole host "
                                                           r"budget of 6\.0 MiB"):
                router.acquire("big")
    assert peak.value == 0, "not a byte of it was written"
    assert len(loads_counted(counter)) == 1, "the second attempt knew its size without loading it again"
    _clear(router, ["big"])


def test_an_underestimated_model_waits_instead_of_overshooting(shm_dir: Path, tmp_path: Path) -> None:
    counter = str(tmp_path / "loads")
    loader_b = functools.partial(counted_blob, counter, 12, 1)
    router = ModelRouter({"a": SharedModel(functools.partial(blob, 4), key="a", directory=shm_dir),
                          "b": SharedModel(loader_b, key="b", directory=shm_dir)},
                         budget=Budget(host=14 * MiB), sizes={"b": "2MiB"}, wait=0.5, load_overhead=1.0)
    with Peak(lambda: held_bytes(shm_dir), every=0.002) as peak:
        shared_a, model_a = router.acquire("a")  # 4 MiB in use
        with pytest.raises(MemoryBudgetExceeded, match=r"model 'b' needs 12\.0 MiB; the host budget is 14\.0 MiB"
                                                       r".*a \(pids"):
            router.acquire("b")  # estimated 2 MiB: loaded, found to be 12 before publishing, refused
        shared_a.release(model_a)
        del model_a
        shared_b, model_b = router.acquire("b")  # now a goes, and b fits
        assert model_b["w"].size == 12 * MiB
        shared_b.release(model_b)
        del model_b
    assert peak.value <= 14 * MiB, f"held {peak.value / MiB:.1f} MiB under a 14 MiB budget"
    assert len(loads_counted(counter)) == 2
    _clear(router, "ab")


def test_a_key_with_no_estimate_takes_the_room_nobody_uses(shm_dir: Path) -> None:
    idle = SharedModel(functools.partial(blob, 1), key="idle", directory=shm_dir, keep_warm=True)
    with idle.use():
        pass  # 1 MiB that nobody holds, published outside any router
    router = ModelRouter(factory=lambda k: SharedModel(functools.partial(blob, 2, 7), key=k, directory=shm_dir),
                         budget=Budget(host="1GiB"), wait=1.0)
    with router.use("new") as model:  # once: "has no known size yet and waits for the budget to be free"
        assert model["seed"] == 7
    del model
    _clear(router, ["new"])
    gc_segments(shm_dir, include_warm=True)


def test_a_lost_ledger_is_rebuilt_from_the_segments_and_hits_refresh_sizes(shm_dir: Path) -> None:
    router = ModelRouter({k: SharedModel(functools.partial(blob, 3, i), key=k, directory=shm_dir)
                          for i, k in enumerate("ab")}, budget=Budget(host="10MiB"), load_overhead=1.0)
    for key in "ab":
        shared, model = router.acquire(key)
        shared.release(model)
    del model
    (shm_dir / LEDGER).write_bytes(b'{"models": {"torn')  # a crash of an older writer, say
    sizes = {k: s.nbytes for k, s in router.stats().items()}
    segments = {p.name.split("--")[0]: p.stat().st_size for p in shm_dir.glob("*.seg")}
    assert sizes == segments, "every segment's size, read back from the segments themselves"
    (shm_dir / LEDGER).write_bytes(b'{"models": {}, "reservations": {}}')  # knows nothing
    with router.use("a"):
        pass
    assert router.stats()["a"].nbytes == segments["a"], "a hit re-learns what the model takes"
    _clear(router, "ab")


class StormMachine(RuleBasedStateMachine):
    """Router users started and SIGKILLed at random points -- while loading, publishing, holding --
    with the directory's held bytes sampled every 2 ms: the largest sample never exceeds the budget."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="modelshare-storm-", dir="/dev/shm"))
        self.storm = Storm(self.directory)
        self.sampler = Sampler(self.directory).__enter__()
        self.rng = random.Random(0)

    @initialize(seeds=st.lists(st.integers(0, 1 << 30), min_size=3, max_size=3))
    def start_users(self, seeds: list[int]) -> None:
        for seed in seeds:
            self.storm.start_user(seed)
        deadline = time.monotonic() + 60
        while self.storm.uses.value < 5 and time.monotonic() < deadline:  # they are all at work
            time.sleep(0.05)

    @rule(delay=st.floats(0.0, 0.5), seed=st.integers(0, 1 << 30))
    def kill_one_and_replace_it(self, delay: float, seed: int) -> None:
        time.sleep(delay)  # wherever it is by then: loading, publishing, holding, evicting
        self.storm.kill_one(self.rng)
        self.storm.start_user(seed)

    @rule(seconds=st.floats(0.05, 0.5))
    def let_them_run(self, seconds: float) -> None:
        time.sleep(seconds)

    @invariant()
    def never_over_budget(self) -> None:
        assert self.sampler.largest <= BUDGET, f"held {self.sampler.largest / MiB:.2f} MiB under 12 MiB"

    def teardown(self) -> None:
        self.storm.stop()
        self.sampler.__exit__(None, None, None)
        assert self.sampler.largest <= BUDGET
        assert self.storm.uses.value >= 5 and self.sampler.samples > 0, "the storm never got going"
        gc_segments(self.directory, include_warm=True)
        shutil.rmtree(self.directory)


StormMachine.TestCase.settings = settings(max_examples=3, stateful_step_count=15, deadline=None)
TestStorm = StormMachine.TestCase
