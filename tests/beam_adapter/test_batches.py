"""Ragged batches, out-of-memory splitting and metrics of SharedModelHandler, in real pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install -e '.[beam]')")
torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install -e '.[torch]')")

from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference  # noqa: E402
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor  # noqa: E402

from beam_adapter import Pad, SharedModelHandler, release_all  # noqa: E402
from beam_adapter import _ragged as batching  # noqa: E402

from ..support import ROOT  # noqa: E402

WIDTH = 16


class PerPosition(torch.nn.Module):
    """[batch, length, width] -> [batch, length, 3]: any length works, one batch needs one length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(WIDTH, 3)

    def forward(self, x: Any) -> Any:
        return self.linear(x)


class Wide(PerPosition):
    """PerPosition with 32 MiB more weights: enough to tell a private copy from none."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(4096, 2048)


class MaskedMean(torch.nn.Module):
    """Mean over the real positions of each sequence, then a linear layer; the mask is
    ``(B, L)``, as a Hugging Face ``attention_mask`` (or the input's full shape)."""

    outputs = 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.linear = torch.nn.Linear(WIDTH, self.outputs)

    def forward(self, x: Any, attention_mask: Any = None) -> Any:
        mask = torch.ones(x.shape[:2]) if attention_mask is None else attention_mask.to(x.dtype)
        if mask.dim() == 2:
            mask = mask.unsqueeze(-1)
        return self.linear((x * mask).sum(1) / mask.sum(1))


class MaskedMeanOfSix(MaskedMean):
    """Pooled to 6 values: the longest sequence's length, so a pooled output and a per-position
    one have the same size whenever a batch holds a sequence of 6."""

    outputs = 6


@pytest.fixture(autouse=True)
def _release(shm_dir: Path) -> Iterable[None]:
    yield
    release_all()


def _sequences(n: int = 10) -> list[Any]:
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.standard_normal((int(rng.integers(2, 7)), WIDTH)).astype(np.float32))
            for _ in range(n)]


def _handler(tmp_path: Path, model_class: type, batch: int = 5) -> PytorchModelHandlerTensor:
    path = tmp_path / f"{model_class.__name__}.pt"
    torch.save(model_class().state_dict(), path)
    return PytorchModelHandlerTensor(state_dict_path=str(path), model_class=model_class, min_batch_size=batch,
                                     max_batch_size=batch)


def _run(handler: Any, examples: list[Any], tmp_path: Path) -> tuple[dict[int, Any], Any]:
    """Run through RunInference; {index: inference as numpy}, and the pipeline's result (metrics)."""
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    pipeline = beam.Pipeline()
    _ = (pipeline | beam.Create(list(enumerate(examples))) | RunInference(KeyedModelHandler(handler))
         | beam.MapTuple(lambda i, r: json.dumps([i, r.inference.numpy().tolist()]))
         | beam.io.WriteToText(str(out)))
    outcome = pipeline.run()
    outcome.wait_until_finish()
    lines = [json.loads(line) for f in tmp_path.glob(out.name + "*") for line in f.read_text().splitlines()]
    return {i: np.asarray(value, dtype=np.float32) for i, value in lines}, outcome


def _one_by_one(model: Any, examples: list[Any], **kwargs: Any) -> list[Any]:
    with torch.inference_mode():
        return [model(e.unsqueeze(0), **kwargs)[0].numpy() for e in examples]


def test_unwrapped_handler_fails_on_ragged_batches(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="stack expects each tensor to be equal size"):
        _run(_handler(tmp_path, PerPosition), _sequences(), tmp_path)


def test_bucket_by_shape_matches_one_by_one(tmp_path: Path) -> None:
    examples = _sequences()
    got, _ = _run(SharedModelHandler(_handler(tmp_path, PerPosition), ragged="bucket"), examples, tmp_path)
    for i, expected in enumerate(_one_by_one(PerPosition().eval(), examples)):
        assert got[i].shape == expected.shape
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("full_mask", [False, True], ids=["(B, L) mask", "full-shape mask"])
def test_pad_with_mask_matches_one_by_one(full_mask: bool, tmp_path: Path) -> None:
    examples = _sequences()
    seen: list[tuple[int, ...]] = []

    class Recording(MaskedMean):
        def forward(self, x: Any, attention_mask: Any = None) -> Any:
            seen.append(tuple(attention_mask.shape))
            return super().forward(x, attention_mask)

    handler = SharedModelHandler(_handler(tmp_path, MaskedMean),
                                 ragged=Pad(value=0.0, mask_arg="attention_mask", full_mask=full_mask))
    got, _ = _run(handler, examples, tmp_path)
    for i, expected in enumerate(_one_by_one(MaskedMean().eval(), examples)):
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)
    model = handler.load_model()
    model.__class__ = Recording  # the same weights; records the mask it is given
    handler.run_inference(examples[:3], model)
    longest = max(e.shape[0] for e in examples[:3])
    assert seen == [(3, longest, WIDTH) if full_mask else (3, longest)]


def test_pad_never_crops_a_pooled_output_whose_size_matches_the_padding(tmp_path: Path) -> None:
    examples = _sequences(20)
    assert max(e.shape[0] for e in examples) == MaskedMeanOfSix.outputs
    handler = SharedModelHandler(_handler(tmp_path, MaskedMeanOfSix), ragged=Pad(mask_arg="attention_mask"))
    got, _ = _run(handler, examples, tmp_path)
    for i, expected in enumerate(_one_by_one(MaskedMeanOfSix().eval(), examples)):
        assert got[i].shape == (6,), f"element {i} (length {examples[i].shape[0]}) was cropped to {got[i].shape}"
        np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)


def test_pad_crops_per_position_outputs(tmp_path: Path) -> None:
    examples = _sequences()
    got, _ = _run(SharedModelHandler(_handler(tmp_path, PerPosition), ragged="pad"), examples, tmp_path)
    for i, expected in enumerate(_one_by_one(PerPosition().eval(), examples)):
        assert got[i].shape == expected.shape == (examples[i].shape[0], 3)
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)


#: input shapes of every forward call of a Recorded model (in-process pipelines)
FORWARDS: list[tuple[int, ...]] = []


class Recorded(PerPosition):
    def forward(self, x: Any) -> Any:
        FORWARDS.append(tuple(x.shape))
        return super().forward(x)


def _continuous(n: int = 60) -> list[Any]:
    """Sequences of many lengths: as many shapes as elements, nearly (what batching in arrival order
    cannot batch)."""
    rng = np.random.default_rng(3)
    return [torch.from_numpy(rng.standard_normal((int(length), WIDTH)).astype(np.float32))
            for length in rng.integers(1, 64, n)]


def _keyed_run(handler: Any, examples: list[Any], tmp_path: Path) -> tuple[dict[int, Any], Any]:
    """Through RunInference(handler) over (index, example) pairs: {index: inference}, and the result."""
    out = tmp_path / f"keyed-{len(list(tmp_path.glob('keyed-*')))}"
    pipeline = beam.Pipeline()
    _ = (pipeline | beam.Create(list(enumerate(examples))) | RunInference(handler)
         | beam.MapTuple(lambda i, r: json.dumps([i, r.inference.numpy().tolist()]))
         | beam.io.WriteToText(str(out)))
    outcome = pipeline.run()
    outcome.wait_until_finish()
    got = dict(json.loads(line) for f in tmp_path.glob(out.name + "*") for line in f.read_text().splitlines())
    return {i: np.asarray(value, dtype=np.float32) for i, value in got.items()}, outcome


def _call_sizes(outcome: Any, handler: Any) -> Any:
    metrics = outcome.metrics().query(MetricsFilter().with_namespace(handler.get_metrics_namespace()))
    return {m.key.metric.name: m.committed for m in metrics["distributions"]}["modelshare_call_size"]


@pytest.mark.parametrize("nesting", ["SharedModelHandler(KeyedModelHandler(h))",
                                     "KeyedModelHandler(SharedModelHandler(h))"])
def test_bucket_makes_one_call_per_distinct_shape(nesting: str, tmp_path: Path) -> None:
    """60 sequences of 41 lengths, batches of 16: grouped over the bundle, not inside Beam's batches
    of arrival order (56 calls there: nearly one per element)."""
    examples = _continuous()
    lengths = {e.shape[0] for e in examples}
    inner = _handler(tmp_path, Recorded, batch=16)
    handler = (SharedModelHandler(KeyedModelHandler(inner), ragged="bucket") if nesting.startswith("Shared")
               else KeyedModelHandler(SharedModelHandler(inner, ragged="bucket")))
    FORWARDS.clear()
    got, outcome = _keyed_run(handler, examples, tmp_path)
    assert len(FORWARDS) == len(lengths) > 30, "one call per distinct shape in the bundle"
    assert max(shape[0] for shape in FORWARDS) <= 16, "no call over the handler's max_batch_size"
    calls = _call_sizes(outcome, handler)
    assert (calls.count, calls.sum, calls.max) == (len(lengths), len(examples), max(s[0] for s in FORWARDS))
    for i, expected in enumerate(_one_by_one(PerPosition().eval(), examples)):
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_waste", [0.25, 0.0, None], ids=["waste<=25%", "no waste", "unbounded"])
def test_pad_groups_by_length_within_a_waste_bound(max_waste: Any, tmp_path: Path) -> None:
    """Pad in length buckets: every call computes at most (1 + max_waste) times the values it holds,
    with far fewer calls than shapes; outputs exact and cropped to each element's length."""
    examples = _continuous()
    inner = _handler(tmp_path, Recorded, batch=16)
    handler = SharedModelHandler(KeyedModelHandler(inner), ragged=Pad(max_waste=max_waste))
    FORWARDS.clear()
    got, outcome = _keyed_run(handler, examples, tmp_path)
    for i, expected in enumerate(_one_by_one(PerPosition().eval(), examples)):
        assert got[i].shape == expected.shape
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)
    computed = sum(b * length for b, length, _ in FORWARDS)
    real = sum(e.shape[0] for e in examples)
    lengths = len({e.shape[0] for e in examples})
    if max_waste is None:
        assert len(FORWARDS) == -(-len(examples) // 16), "one padded shape per call of 16"
    elif max_waste == 0:
        assert len(FORWARDS) == lengths and computed == real, "no waste: exact shapes, as bucket"
    else:
        assert len(FORWARDS) <= lengths // 3 and computed <= (1 + max_waste) * real
    assert _call_sizes(outcome, handler).sum == len(examples)


@pytest.mark.parametrize("ragged", ["bucket", "pad"])
def test_ragged_calls_respect_the_handlers_batch_weight(ragged: str, tmp_path: Path) -> None:
    """element_size_fn + max_batch_weight (tokens per call, say): each call holds at most 200
    positions and 16 elements (Beam's own BatchElements does not take max_batch_weight)."""
    path = tmp_path / "recorded.pt"
    torch.save(Recorded().state_dict(), path)
    inner = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=Recorded, max_batch_size=16,
                                      max_batch_weight=200, element_size_fn=lambda kv: int(kv[1].shape[0]))
    examples = _continuous()
    FORWARDS.clear()
    got, _ = _keyed_run(SharedModelHandler(KeyedModelHandler(inner), ragged=ragged), examples, tmp_path)
    assert len(got) == len(examples)
    assert max(b for b, _, _ in FORWARDS) <= 16
    bound = 200 if ragged == "bucket" else 200 * 1.25  # padded: at most max_waste more than it holds
    assert max(b * length for b, length, _ in FORWARDS) <= bound, FORWARDS
    assert sum(b for b, _, _ in FORWARDS) == len(examples)


def test_ragged_never_meets_beams_stateful_batching_failure(tmp_path: Path) -> None:
    """A handler with max_batch_duration_secs (Beam's stateful batching): with ragged= the window is
    the bundle's, no state or timers, and it runs -- grouped, every output right. (Passed on to
    Beam, windows that only its buffering timer flushed failed this pipeline on the default runner
    with an AssertionError in Beam's GroupByKey evaluator.)"""
    path = tmp_path / "recorded.pt"
    torch.save(Recorded().state_dict(), path)
    inner = PytorchModelHandlerTensor(state_dict_path=str(path), model_class=Recorded, max_batch_size=16,
                                      max_batch_duration_secs=1)
    examples = _continuous()
    FORWARDS.clear()
    got, _ = _keyed_run(SharedModelHandler(KeyedModelHandler(inner), ragged="pad"), examples, tmp_path)
    for i, expected in enumerate(_one_by_one(PerPosition().eval(), examples)):
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)
    assert sum(b for b, _, _ in FORWARDS) == len(examples) and len(FORWARDS) <= len(examples) // 4


def test_ragged_refuses_elements_without_a_shape(tmp_path: Path) -> None:
    class Echo(ModelHandler):
        def load_model(self) -> Any:
            return np.zeros(4)

        def run_inference(self, batch: Any, model: Any, inference_args: Any = None) -> Any:
            return [PredictionResult(x, x) for x in batch]

    handler = SharedModelHandler(Echo(), ragged="pad")
    with pytest.raises(TypeError, match="ragged=Pad.*numpy arrays and torch tensors.*not str"):
        handler.run_inference(["a", "bc"], handler.load_model())
    bucketed = SharedModelHandler(Echo(), ragged="bucket")
    dicts = [{"ids": np.zeros(n)} for n in (2, 3, 2)]
    assert [r.example for r in bucketed.run_inference(dicts, bucketed.load_model())] == dicts, "dicts bucket"


def test_grouping_for_padding_keeps_its_bounds() -> None:
    rng = np.random.default_rng(5)
    for trial in range(50):
        items = [np.zeros((int(n), 1 + trial % 3)) for n in rng.integers(0, 200, int(rng.integers(1, 80)))]
        waste, size = float(rng.choice([0.0, 0.1, 0.5])), int(rng.integers(1, 20))
        groups = batching.group_for_padding(items, waste, size)
        assert sorted(i for g in groups for i in g) == list(range(len(items)))
        for group in groups:
            longest = max(items[i].shape[0] for i in group)
            assert len(group) <= size
            assert len(group) * longest * items[0].shape[1] <= (1 + waste) * sum(items[i].size for i in group)
        weights = [len(item) for item in items]  # weighed as element_size_fn would: by length
        for grouping in (batching.group_for_padding(items, waste, 300, weights, size),
                         batching.group_by_shape(items, 300, weights, size)):
            assert sorted(i for g in grouping for i in g) == list(range(len(items)))
            assert all(len(g) <= size and (sum(weights[i] for i in g) <= 300 or len(g) == 1) for g in grouping)


def test_metrics_count_loads_and_shared_bytes(tmp_path: Path) -> None:
    handler = _handler(tmp_path, Wide)
    _, outcome = _run(SharedModelHandler(handler, ragged="bucket"), _sequences(), tmp_path)
    metrics = outcome.metrics().query(MetricsFilter().with_namespace(handler.get_metrics_namespace()))
    counters = {m.key.metric.name: m.committed for m in metrics["counters"]}
    sizes = {m.key.metric.name: m.committed for m in metrics["distributions"]}
    assert counters.get("modelshare_loads") == 1 and counters.get("modelshare_attaches", 0) == 0
    assert sizes["modelshare_shared_bytes"].sum > 32 << 20, "the weights are in the segment"
    assert sizes["modelshare_private_bytes"].sum < 8 << 20, "and the loader kept no private copy of them"
    assert sizes["modelshare_load_latency_ms"].count == 1 and "modelshare_attach_latency_ms" not in sizes


def test_batching_helpers() -> None:
    a, b = np.ones((2, 3)), np.ones((4, 3))
    assert batching.group_by_shape([a, b, a]) == [[0, 2], [1]]
    padded, masks = batching.pad([a, b], value=-1)
    assert padded[0].shape == (4, 3) and padded[0][3, 0] == -1
    assert masks[0].shape == (4,) and masks[0].sum() == 2, "a sequence mask: one entry per position"
    _, full = batching.pad([a, b], value=-1, full_mask=True)
    assert full[0].shape == (4, 3) and full[0].sum() == 6
    assert batching.crop(np.zeros((4, 7)), (2, 3), (4, 3)).shape == (2, 7)
    assert batching.crop(np.zeros(4), (2, 3), (4, 3)).shape == (4,), "pooled: never cut"
    assert batching.crop(np.zeros((4, 9)), (2,), (4,)).shape == (2, 9), "token ids: per-token scores are cut"
    with pytest.raises(ValueError, match="different numbers of dimensions"):
        batching.pad([np.ones(3), np.ones((2, 2))])


OOM_PIPELINE = textwrap.dedent("""
    import resource, sys, json
    import numpy as np
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference
    from beam_adapter import SharedModelHandler

    class Hungry(ModelHandler):
        '''Needs ~150 MiB of scratch memory per element in a batch.'''
        def __init__(self):
            super().__init__(min_batch_size=8, max_batch_size=8)
        def load_model(self):
            return np.arange(4.0)
        def run_inference(self, batch, model, inference_args=None):
            if resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY:
                # a real limit, set once the runner's threads are up: 500 MiB more than now
                vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
                resource.setrlimit(resource.RLIMIT_AS, (vm + (500 << 20), resource.RLIM_INFINITY))
            scratch = np.ones((len(batch), 150 << 17))  # 150 MiB of float64 per element
            return [PredictionResult(x, float(x) * scratch[i, 0] + model.sum()) for i, x in enumerate(batch)]

    with beam.Pipeline() as p:
        (p | beam.Create([(i, float(i)) for i in range(16)])
           | RunInference(KeyedModelHandler(SharedModelHandler(Hungry())))
           | beam.MapTuple(lambda i, r: print(json.dumps(["result", i, r.inference]), flush=True)))
""")


def test_batch_that_runs_out_of_memory_is_split(shm_dir: Path) -> None:
    run = subprocess.run([sys.executable, "-c", OOM_PIPELINE], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    results = dict(json.loads(line)[1:] for line in run.stdout.splitlines() if line.startswith('["result"'))
    assert results == {i: float(i) + 6.0 for i in range(16)}, "every element survives, with its own result"
    assert "a batch of 8 ran out of memory; splitting it, and capping batches at 4" in run.stderr


def test_threads_are_shared_out_among_holders(shm_dir: Path, spawn) -> None:
    import functools

    from modelshare import SharedModel
    from modelshare.threads import ThreadShare

    from ..support import workers as _workers

    cores = os.cpu_count() or 1
    shared = SharedModel(functools.partial(_workers.make_mlp, 4, width=256), key="threads")
    model = shared.acquire()
    assert ThreadShare("auto").count(shared) == cores and ThreadShare(3).count(shared) == 3
    assert ThreadShare(None).count(shared) is None
    results, done = spawn.Queue(), spawn.Event()
    other = spawn.Process(target=_workers.use_worker, args=(shared, _workers.sample_input(256), results, done),
                          daemon=True)
    other.start()
    try:
        results.get(timeout=120)  # the other process holds the model now
        assert len(shared.holders()) == 2
        assert ThreadShare("auto").count(shared) == max(1, cores // 2)
    finally:
        done.set()
        other.join(60)
        shared.release(model)
    with pytest.raises(ValueError, match="threads must be a positive int, 'auto' or None"):
        ThreadShare(0)


def test_threads_applied_to_torch_in_a_pipeline(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        _run(SharedModelHandler(_handler(tmp_path, PerPosition), ragged="bucket", threads=1), _sequences(), tmp_path)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _overcommit_heuristic() -> bool:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "0"
    except OSError:
        return False


class VirtualHungry:
    """Asks torch's CPU allocator for ``share`` of the machine's RAM + swap per element (untouched):
    the kernel's overcommit heuristic refuses a batch of 3 or more -- a real allocator failure."""

    def __init__(self, share: float = 0.4) -> None:
        import psutil

        self.per_element = int((psutil.virtual_memory().total + psutil.swap_memory().total) * share)
        self.sizes: list[int] = []

    def __call__(self, batch: Any) -> Any:
        self.sizes.append(len(batch))
        scratch = torch.empty(len(batch) * self.per_element, dtype=torch.uint8)
        del scratch
        return [float(x) * 2 for x in batch]


class VirtualHungryHandler(ModelHandler):
    def __init__(self) -> None:
        super().__init__(min_batch_size=4, max_batch_size=4)

    def load_model(self) -> VirtualHungry:
        return VirtualHungry()

    def run_inference(self, batch: Any, model: Any, inference_args: Any = None) -> Any:
        return [PredictionResult(x, y) for x, y in zip(batch, model(batch))]


@pytest.mark.skipif(not _overcommit_heuristic(), reason="needs vm.overcommit_memory=0 (the kernel's heuristic) "
                                                         "for an allocation the allocator refuses")
@pytest.mark.parametrize("share", ["threads", "processes"])
def test_torch_cpu_allocator_failures_are_split(share: str, tmp_path: Path, shm_dir: Path) -> None:
    def build(handler: Any) -> Any:
        pipeline = beam.Pipeline()
        _ = (pipeline | beam.Create([float(i) for i in range(12)]) | RunInference(handler)
             | beam.Map(lambda r: json.dumps([r.example, r.inference]))
             | beam.io.WriteToText(str(tmp_path / f"out-{share}-{type(handler).__name__}")))
        return pipeline

    with pytest.raises(RuntimeError, match="can't allocate memory"):
        build(VirtualHungryHandler()).run().wait_until_finish()  # Beam fails the batch
    outcome = build(SharedModelHandler(VirtualHungryHandler(), share)).run()
    outcome.wait_until_finish()
    lines = [json.loads(line) for f in tmp_path.glob(f"out-{share}-SharedModelHandler*")
             for line in f.read_text().splitlines()]
    assert sorted(lines) == [[float(i), float(i) * 2] for i in range(12)]
    counters = {m.key.metric.name: m.committed for m in outcome.metrics().query()["counters"]}
    assert counters.get("failed_batches_counter", 0) == 0


class NeedsTooMuchFor11(ModelHandler):
    """Element 11 asks numpy for 1 EiB (a real allocator refusal: MemoryError), even alone."""

    def __init__(self) -> None:
        super().__init__(min_batch_size=4, max_batch_size=4)

    def load_model(self) -> Any:
        return np.arange(2.0)

    def run_inference(self, batch: Any, model: Any, inference_args: Any = None) -> Any:
        scratch = np.empty(1 << 60 if 11.0 in batch else 8, dtype=np.uint8)
        return [PredictionResult(x, float(x) * 2 + model.sum() - 1 + scratch[:0].sum()) for x in batch]


def test_an_element_that_fails_alone_fails_its_batch_counted_by_beam(tmp_path: Path, shm_dir: Path) -> None:
    """Splitting stops at a single element: if that still runs out of memory, the batch fails as in
    Beam -- to the dead-letter output, counted by Beam's failed_batches_counter -- and the rest of
    the pipeline's batches are right."""
    handler = SharedModelHandler(NeedsTooMuchFor11())
    pipeline = beam.Pipeline()
    examples = pipeline | beam.Create([float(i) for i in range(16)])
    good, bad = examples | RunInference(handler).with_exception_handling()
    _ = (good | "ok" >> beam.Map(lambda r: json.dumps([r.example, r.inference]))
         | "good" >> beam.io.WriteToText(str(tmp_path / "good")))
    _ = (bad.failed_inferences | "failed" >> beam.Map(lambda e: json.dumps(sorted(e[0])))
         | "bad" >> beam.io.WriteToText(str(tmp_path / "bad")))
    outcome = pipeline.run()
    outcome.wait_until_finish()
    good_rows = [json.loads(line) for f in tmp_path.glob("good*") for line in f.read_text().splitlines()]
    bad_rows = [json.loads(line) for f in tmp_path.glob("bad*") for line in f.read_text().splitlines()]
    assert len(bad_rows) == 1 and 11.0 in bad_rows[0], bad_rows
    assert sorted(good_rows) == [[float(i), float(i) * 2] for i in range(16) if float(i) not in bad_rows[0]]
    metrics = outcome.metrics().query(MetricsFilter().with_namespace(handler.get_metrics_namespace()))
    counters = {m.key.metric.name: m.committed for m in metrics["counters"]}
    assert counters["failed_batches_counter"] == 1


def test_the_cap_is_probed_back_up_after_a_transient_out_of_memory() -> None:
    from beam_adapter._batches import PROBE_AFTER, BatchRunner

    sizes: list[int] = []

    def run_inference(batch: Any, model: Any, inference_args: Any) -> list[Any]:
        sizes.append(len(batch))
        if len(sizes) == 1:  # the first call meets memory that is briefly gone (a real allocator refusal)
            torch.empty(1 << 62, dtype=torch.uint8)
        return list(batch)

    runner = BatchRunner()
    for _ in range(2 * PROBE_AFTER):
        assert runner.run(run_inference, list(range(8)), None, None) == list(range(8))
    assert sizes[1:3] == [4, 4], "split once"
    assert sizes[-1] == 8 and runner.cap is None, "the cap was lifted once batches fitted again"


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("out of memory"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 32212254720 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul "
                 "node. Name:'m' Status Message: Failed to allocate memory for requested buffer of size 4294967296"),
    RuntimeError("std::bad_alloc"),
    OSError(12, "Cannot allocate memory"),
], ids=repr)
def test_allocation_failures_are_recognised(error: BaseException) -> None:
    from beam_adapter._batches import is_out_of_memory

    assert is_out_of_memory(error)
    assert not is_out_of_memory(ValueError("shapes (4,3) and (4,3) not aligned"))


def test_metrics_add_up_across_worker_processes(tmp_path: Path, shm_dir: Path) -> None:
    """Two SDK worker processes: one load, the other attaches; the distributions' sums and counts
    are the machine's totals and its processes (a gauge would show one worker's value)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    handler = SharedModelHandler(_handler(tmp_path, Wide))
    pipeline = beam.Pipeline(options=PipelineOptions(direct_num_workers=2, direct_running_mode="multi_processing"))
    _ = (pipeline | beam.Create([torch.ones(3, WIDTH) * i for i in range(40)]) | beam.Reshuffle()
         | RunInference(handler) | beam.Map(lambda r: None))
    outcome = pipeline.run()
    outcome.wait_until_finish()
    metrics = outcome.metrics().query(MetricsFilter().with_namespace(handler.get_metrics_namespace()))
    counters = {m.key.metric.name: m.committed for m in metrics["counters"]}
    sizes = {m.key.metric.name: m.committed for m in metrics["distributions"]}
    loads, attaches = counters.get("modelshare_loads", 0), counters.get("modelshare_attaches", 0)
    assert loads == 1 and "modelshare_attachs" not in counters
    took = loads + attaches  # the processes that took the model
    assert took >= 1 and sizes["modelshare_shared_bytes"].count == took
    assert sizes["modelshare_shared_bytes"].sum == took * sizes["modelshare_shared_bytes"].max > took * (32 << 20)
    assert sizes["modelshare_private_bytes"].count == took
    assert sizes["modelshare_load_latency_ms"].count == 1
    assert sizes.get("modelshare_attach_latency_ms", None) is None or \
        sizes["modelshare_attach_latency_ms"].count == attaches
    assert counters["num_inferences"] == 40
    calls = sizes["modelshare_call_size"]  # one value per call of the wrapped handler's run_inference
    assert calls.sum == 40 and calls.count == sizes["inference_batch_latency_micro_secs"].count and calls.max <= 5


ATTACH = textwrap.dedent("""
    import json, sys
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
    from beam_adapter import SharedModelHandler
    from tests.beam_adapter.test_batches import Wide

    opened = []
    handler = SharedModelHandler(PytorchModelHandlerTensor(state_dict_path=sys.argv[1], model_class=Wide,
                                                           min_batch_size=5, max_batch_size=5))  # as _handler's
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
    model = handler.load_model()
    info = handler._shared.hold_info()
    print(json.dumps({"loaded_here": info.loaded_here, "opened": opened}))
""")


def test_an_attach_reads_neither_the_model_nor_smaps(tmp_path: Path, shm_dir: Path) -> None:
    """What Beam times as an attaching worker's load_model: mapping the segment and building an
    instance over it -- not the model file, not a walk of /proc/self/smaps (tens of ms with torch
    loaded): the private-bytes metric reads /proc/self/status."""
    handler = _handler(tmp_path, Wide)
    wrapped = SharedModelHandler(handler)
    held = wrapped.load_model()  # published by this process
    run = subprocess.run([sys.executable, "-c", ATTACH, handler._state_dict_path], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["loaded_here"] is False, "the worker attached"
    assert not [f for f in report["opened"] if f.endswith(".pt") or "smaps" in f], report["opened"]
    assert any(str(shm_dir) in f for f in report["opened"]), "it opened the segment"
    del held


@pytest.mark.parametrize("ragged", ["bucket", "pad"])
def test_a_wrapped_keyed_handler_honours_ragged(ragged: str, tmp_path: Path) -> None:
    """SharedModelHandler(KeyedModelHandler(h), ragged=...): the keyed examples are bucketed or padded
    (unwrapped, the same pipeline fails with "stack expects each tensor to be equal size")."""
    examples = _sequences()
    handler = SharedModelHandler(KeyedModelHandler(_handler(tmp_path, PerPosition)), ragged=ragged)
    out = tmp_path / "keyed"
    pipeline = beam.Pipeline()
    _ = (pipeline | beam.Create(list(enumerate(examples))) | RunInference(handler)
         | beam.MapTuple(lambda i, r: json.dumps([i, r.inference.numpy().tolist()]))
         | beam.io.WriteToText(str(out)))
    pipeline.run().wait_until_finish()
    got = dict(json.loads(line) for f in tmp_path.glob("keyed*") for line in f.read_text().splitlines())
    for i, expected in enumerate(_one_by_one(PerPosition().eval(), examples)):
        np.testing.assert_allclose(np.asarray(got[i], dtype=np.float32), expected, rtol=1e-6, atol=1e-6)
