"""ModelRouter: many keyed models under a machine-wide byte budget; real processes, real SIGKILLs."""

from __future__ import annotations

import functools
import random
import threading
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from modelshare import Budget, MemoryBudgetExceeded, ModelRouter, Processes, SharedModel, memory
from modelshare.budget import parse_size
from modelshare.memory import Peak

from ..support import ROOT
from ..support import workers as _workers
from ..support.workers import MiB, blob


def _router(directory: Path, budget_mib: int, keys: list[str], mib: int = 4, wait: float = 0.0) -> ModelRouter:
    models = {k: SharedModel(functools.partial(blob, mib, i), key=k, directory=directory) for i, k in enumerate(keys)}
    return ModelRouter(models, budget=Budget(host=budget_mib * MiB), wait=wait, load_overhead=1.0)


def _segments(directory: Path) -> set[str]:
    return {p.name.split("--")[0] for p in directory.glob("*.seg")}


def test_sizes_parse_and_bad_sizes_say_how() -> None:
    assert parse_size("512MiB") == 512 << 20 and parse_size("4 GiB") == 4 << 30 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == 3 << 29 and parse_size(1024) == 1024
    for bad in ("lots", "4 parsecs", -1, 1.5, True):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    assert Budget(host="1GiB", gpu={0: "2GiB"}).gpu == {0: 2 << 30}


def test_least_recently_used_unheld_model_is_evicted(shm_dir: Path) -> None:
    router = _router(shm_dir, 13, ["a", "b", "c"])  # room for three 4 MiB models, not four
    for key in ("a", "b", "c"):
        with router.use(key) as model:
            assert model["seed"] == "abc".index(key)
    assert _segments(shm_dir) == {"a", "b", "c"}, "released models stay loaded within the budget"
    with router.use("a"):
        pass  # a is now the most recently used
    router = ModelRouter({**{k: router.model(k) for k in "abc"},
                          "d": SharedModel(functools.partial(blob, 4, 3), key="d", directory=shm_dir)},
                         budget=router.budget, load_overhead=1.0)
    with router.use("d"):
        assert _segments(shm_dir) == {"a", "c", "d"}, "b was the least recently used"
    stats = router.stats()
    assert stats["b"].evictions == 1 and stats["a"].hits == 1 and stats["d"].loads == 1
    assert router.held_bytes() <= 13 * MiB
    _clear(router, "acd")


def _clear(router: ModelRouter, keys) -> None:
    """Unload every model of ``keys`` and remove the ledger (a router keeps both on purpose)."""
    from modelshare._host.holds import forget_lingering
    from modelshare._host.inventory import evict

    for key in keys:
        forget_lingering(router.model(key).segment_name)  # a test's last `model` name may still map it
        assert evict(router.model(key).segment_name) or not router.model(key).segment_name.seg_path.exists()
    for path in router.directory.glob("router.*"):  # ledger, its lock, the users' lock
        path.unlink()


def test_a_model_in_use_is_never_evicted_and_the_error_names_its_holder(shm_dir: Path) -> None:
    router = _router(shm_dir, 9, ["a", "b", "c"])  # two at a time
    with router.use("a"), router.use("b"):
        with pytest.raises(MemoryBudgetExceeded, match=r"model 'c' needs 4.0 MiB; the host budget is 9.0 MiB.*"
                                                       r"'?a'? \(pids \[\d+\]\)"):
            with router.use("c"):
                pass
        assert _segments(shm_dir) == {"a", "b"}
    with router.use("c"):  # now a (least recently used, unheld) makes room
        assert _segments(shm_dir) == {"b", "c"}
    _clear(router, "abc")


def test_a_load_counts_the_loaders_private_copy_by_default(shm_dir: Path) -> None:
    models = {k: SharedModel(functools.partial(_workers.slow_blob, 4, i), key=k, directory=shm_dir)
              for i, k in enumerate("ab")}
    router = ModelRouter(models, budget=Budget(host=11 * MiB), wait=0)  # measured: a 4 MiB blob needs ~8 to load
    with router.use("a"):
        pass
    with router.use("b"):  # 4 held + 8 while b loads > 11: a (unheld) goes first
        assert _segments(shm_dir) == {"b"}
    lone = ModelRouter({"c": SharedModel(functools.partial(blob, 4, 2), key="c", directory=shm_dir)},
                       budget=Budget(host=6 * MiB), sizes={"c": 4 * MiB}, wait=0)
    with lone.use("c") as model:  # 8 MiB to load > the budget: it loads alone, b evicted first
        assert model["seed"] == 2 and _segments(shm_dir) == {"c"}
    del model
    _clear(router, "ab")
    _clear(lone, "c")


_ROUTE_OVER_A_WARM_HEAP = """
import ctypes, functools, os, sys
import numpy as np
from modelshare import Budget, ModelRouter, SharedModel
from tests.support import workers
MiB = 2**20
libc = ctypes.CDLL(None)
libc.mallopt(-3, 64 * MiB)  # M_MMAP_THRESHOLD: the loader's 4 MiB comes from the heap
libc.mallopt(-1, 2048 * MiB)  # M_TRIM_THRESHOLD: freed heap pages stay resident
junk = [np.ones(MiB // 2) for _ in range(40)]
del junk
directory = sys.argv[1]
models = {k: SharedModel(functools.partial(workers.slow_blob, 4, i), key=k, directory=directory)
          for i, k in enumerate("ab")}
router = ModelRouter(models, budget=Budget(host=11 * MiB), wait=0)
with router.use("a"):
    pass
with router.use("b"):
    print(sorted(f.split("--")[0] for f in os.listdir(directory) if f.endswith(".seg")))
from tests.router.test_router import _clear
_clear(router, "ab")
"""


def test_a_loaders_copy_counts_even_where_freed_heap_would_hide_it(shm_dir: Path) -> None:
    """A process whose heap holds freed, still-resident pages (a long-lived worker's) builds the
    next model in them without its RSS growing: the router gives them back before it measures."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _ROUTE_OVER_A_WARM_HEAP, str(shm_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['b']", "b loaded beside a: its loader's copy was not counted"


def test_a_model_larger_than_the_budget_fails_at_once(shm_dir: Path) -> None:
    router = ModelRouter({"big": SharedModel(functools.partial(blob, 8), key="big", directory=shm_dir)},
                         budget=Budget(host="4MiB"), sizes={"big": "8MiB"})
    with pytest.raises(MemoryBudgetExceeded, match="more than the whole host budget"):
        router.acquire("big")
    assert not list(shm_dir.glob("*.seg"))
    _clear(router, ["big"])
    with pytest.raises(KeyError, match="no model for key 'nope'"):
        router.model("nope")


def test_factory_resolves_open_ended_keys(shm_dir: Path) -> None:
    router = ModelRouter(factory=lambda k: SharedModel(functools.partial(blob, 2, int(k)), key=f"m{k}",
                                                       directory=shm_dir), budget=Budget(host="5MiB"), load_overhead=1)
    for k in ("1", "2", "3", "1"):
        with router.use(k) as model:
            assert model["seed"] == int(k)
    assert router.held_bytes() <= 5 * MiB
    _clear(router, ("1", "2", "3"))


def test_two_processes_cycling_six_models_never_exceed_the_budget(shm_dir: Path, spawn) -> None:
    keys = [f"m{i}" for i in range(6)]
    budget = 50 * MiB  # six models of 20 MiB: at most two at a time
    with Peak(lambda: memory.segment_bytes(shm_dir), every=0.002) as held:
        results = spawn.Queue()
        procs = [spawn.Process(target=_workers.route_worker, args=(str(shm_dir), budget, keys, 20, 40, seed, results))
                 for seed in (1, 2)]
        for proc in procs:
            proc.start()
        got = [results.get(timeout=300) for _ in procs]
        for proc in procs:
            proc.join(60)
    assert all(errors == [] for _, _, errors, _, _ in got), got
    assert held.value <= budget, f"held {held.value / MiB:.0f} MiB under a {budget / MiB:.0f} MiB budget"
    assert max(uses for *_, uses, _ in got) == 80 and max(evictions for *_, evictions in got) > 0
    assert not list(shm_dir.glob("*.seg")), "the last router user to exit evicted what the routers kept warm"
    _clear(_router(shm_dir, 50, keys, 20), keys)


def test_sigkill_of_a_holder_releases_its_models_and_the_ledger_stays_right(shm_dir: Path, spawn) -> None:
    results = spawn.Queue()
    holder = spawn.Process(target=_workers.hold_routed_and_wait, args=(str(shm_dir), 9 * MiB, ["a", "b"], 4, results))
    holder.start()
    results.get(timeout=120)
    router = _router(shm_dir, 9, ["a", "b", "c"])
    with pytest.raises(MemoryBudgetExceeded):
        router.acquire("c")  # a and b are in use by the holder
    holder.kill()
    holder.join(30)
    with router.use("c") as model:  # the kernel released its holds: a (least recently used) makes room
        assert model["seed"] == 2
    assert router.held_bytes() <= 9 * MiB and len(_segments(shm_dir)) == 2
    _clear(router, "abc")


class RouterMachine(RuleBasedStateMachine):
    """Random interleavings of use, release and new keys of random sizes; invariants after each step."""

    def __init__(self) -> None:
        super().__init__()
        import uuid

        self.directory = Path("/dev/shm") / f"modelshare-router-{uuid.uuid4().hex[:8]}"
        self.router = ModelRouter(budget=Budget(host=12 * MiB), directory=self.directory, wait=0, load_overhead=1.0,
                                  factory=lambda k: SharedModel(functools.partial(blob, self.sizes[k], len(k)),
                                                                key=k, directory=self.directory),
                                  sizes=lambda k: self.sizes[k] * MiB)
        self.sizes: dict[str, int] = {}
        self.held: list[tuple[str, SharedModel, object]] = []
        self.order: list[str] = []  # least recently used first

    @rule(size=st.integers(1, 5))
    def new_key(self, size: int) -> None:
        self.sizes[f"k{len(self.sizes)}"] = size

    @precondition(lambda self: self.sizes)
    @rule(data=st.data())
    def use(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.sizes)))
        before = {p.name.split("--")[0] for p in self.directory.glob("*.seg")}
        try:
            shared, model = self.router.acquire(key)
        except MemoryBudgetExceeded:
            in_use = {k for k, _, _ in self.held}
            held_bytes = sum(p.stat().st_size for p in self.directory.glob("*.seg") if p.name.split("--")[0] in in_use)
            assert held_bytes + self.sizes[key] * MiB > 12 * MiB, "refused although it would fit"
            return
        self.held.append((key, shared, model))
        after = {p.name.split("--")[0] for p in self.directory.glob("*.seg")}
        evicted = before - after
        in_use = {k for k, _, _ in self.held}
        assert not evicted & in_use, "a model in use was evicted"
        unheld_lru = [k for k in self.order if k in before and k not in in_use]
        assert set(unheld_lru[: len(evicted)]) == evicted, f"evicted {evicted}, LRU order {unheld_lru}"
        self.order = [k for k in self.order if k != key] + [key]

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        key, shared, model = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        shared.release(model)

    @invariant()
    def within_budget(self) -> None:
        assert sum(p.stat().st_size for p in self.directory.glob("*.seg")) <= 12 * MiB

    def teardown(self) -> None:
        import shutil

        for _, shared, model in self.held:
            shared.release(model)
        shutil.rmtree(self.directory, ignore_errors=True)


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)


def test_random_threads_never_exceed_the_budget(shm_dir: Path) -> None:
    keys = [f"t{i}" for i in range(5)]
    router = _router(shm_dir, 10, keys, 3, wait=30)  # three threads, three models fit: a fourth waits
    errors: list[BaseException] = []
    peak = [0]

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            try:
                with router.use(rng.choice(keys)):
                    peak[0] = max(peak[0], router.held_bytes())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and peak[0] <= 10 * MiB
    _clear(router, keys)


def test_modelshare_top_shows_hit_rates(shm_dir: Path) -> None:
    import subprocess
    import sys

    router = _router(shm_dir, 20, ["a", "b"])
    for key in "aab":
        with router.use(key):
            pass
    view = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), "top", "--once"],
                          capture_output=True, text=True, check=True).stdout
    assert "ROUTED KEY" in view and "HIT RATE" in view
    routed = view.split("ROUTED KEY", 1)[1].splitlines()
    row = next(line for line in routed if line.startswith("a "))
    assert row.split()[1:4] == ["1", "1", "50%"]
    _clear(router, "ab")


def test_a_full_budget_waits_for_models_in_use_to_be_released(shm_dir: Path) -> None:
    router = _router(shm_dir, 9, ["a", "b", "c"], wait=30)
    shared_a, model_a = router.acquire("a")
    with router.use("b"):
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(router.acquire("c")))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and not got, "c waits: a and b are in use"
        shared_a.release(model_a)  # a goes out of use: c evicts it and loads
        waiter.join(30)
    (shared_c, model_c), = got
    assert model_c["seed"] == 2 and _segments(shm_dir) == {"b", "c"}
    shared_c.release(model_c)
    _clear(router, "abc")


def test_the_last_router_user_to_exit_evicts_the_warm_models(shm_dir: Path, spawn) -> None:
    import subprocess
    import sys

    code = ("import functools, sys; sys.path.insert(0, {root!r}); from tests.support.workers import blob; "
            "from modelshare import Budget, ModelRouter, SharedModel; "
            "r = ModelRouter({{'a': SharedModel(functools.partial(blob, 2), key='a', directory={d!r})}}, "
            "budget=Budget(host='8MiB')); r.use('a').__enter__(); print('held', flush=True){tail}")
    root = str(ROOT)
    subprocess.run([sys.executable, "-c", code.format(root=root, d=str(shm_dir), tail="")], check=True)
    assert not list(shm_dir.glob("*.seg")), "the only user exited: its warm model went with it"
    killed = subprocess.Popen([sys.executable, "-c", code.format(root=root, d=str(shm_dir),
                               tail="; import time; time.sleep(60)")], stdout=subprocess.PIPE)
    assert killed.stdout.readline() == b"held\n"
    killed.kill()
    killed.wait()
    killed.stdout.close()
    assert len(list(shm_dir.glob("*.seg"))) == 1, "a SIGKILLed user runs no exit hook"
    out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shm_dir), "gc"], capture_output=True,
                         text=True, check=True).stdout
    assert not list(shm_dir.glob("*.seg")) and ".seg" in out, "modelshare gc evicts what no router user holds"
    assert not list(shm_dir.glob("router.*")), "and, nothing routed left, the routers' own files"
    for path in shm_dir.glob("a--*.lock"):
        path.unlink()


def test_a_gpu_budget_goes_to_the_models_on_that_gpu(shm_dir: Path) -> None:
    on_gpu = SharedModel(functools.partial(blob, 1), key="g", directory=shm_dir,
                         share=Processes(device="cuda:1", gpu_budget="3GiB"))
    router = ModelRouter({"g": on_gpu, "h": SharedModel(functools.partial(blob, 1), key="h", directory=shm_dir)},
                         budget=Budget(host="1GiB", gpu={0: "1GiB", 1: "2GiB"}))
    assert router.model("g").mode.gpu_budget == 2 << 30  # the tighter of the two
    assert on_gpu.mode.gpu_budget == 3 << 30 and not on_gpu.keep_warm, "the user's SharedModel is left as it was"
    assert router.model("g").keep_warm and router.model("g").version_hash == on_gpu.version_hash
    assert router.model("h").mode.gpu_budget is None and router.model("h").mode.device is None
    if not memory.gpus():
        from modelshare import DeviceUnavailableError

        with pytest.raises(DeviceUnavailableError, match="needs an NVIDIA GPU"):
            router.acquire("g")
        assert not list(shm_dir.glob("*.seg"))  # nothing loaded for a GPU that is not there
    _clear(router, ["g", "h"])
