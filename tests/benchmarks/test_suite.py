"""CI-sized runs of the OOM benchmark suite: real cgroups, real OOM kills, Beam's real classes.

Each scenario runs end to end through ``python -m benchmarks`` with a small model; the tests
assert who survives the limit, peak memory against it and outputs -- never time. They need a
memory cgroup (root, or a delegated subtree) and skip with the reason where none can be made;
the fallback without one (peaks compared to the limit) is tested everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks.cgroup import MemoryCgroup, unavailable_reason
from benchmarks.suite import report
from benchmarks.suite.run import prepare_model, run_one
from benchmarks.suite.scenarios import get

from ..support import ROOT

pytest.importorskip("apache_beam", reason="the suite's peers are Beam's own classes: pip install -e '.[beam]'")
NO_CGROUP = unavailable_reason()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=f"no memory cgroup: {NO_CGROUP}")


def _suite(out: Path, *args: str) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| approach | processes | result |" in proc.stdout  # the table is printed
    (folder,) = out.iterdir()
    assert (folder / "results.md").exists() and list(folder.glob("memory-over-time-*.png"))
    return {json.loads(p.read_text())["approach"]: json.loads(p.read_text()) for p in folder.glob("*.json")}


@needs_cgroup
def test_cgroup_oom_kill_is_seen() -> None:
    cgroup = MemoryCgroup.create("modelshare-test-oom", 64 << 20)
    try:
        proc = subprocess.run(cgroup.wrap([sys.executable, "-c", "b = bytearray(256 << 20); b[::4096] = b'x' * 65536"]),
                              capture_output=True)
        assert proc.returncode == -9 and cgroup.oom_kills() == 1
        assert cgroup.peak() <= 64 << 20
    finally:
        cgroup.remove()


@needs_cgroup
def test_scenario_3_private_copies_are_oom_killed_modelshare_completes(tmp_path: Path) -> None:
    runs = _suite(tmp_path, "--scenario", "3", "--framework", "torch", "--size-mib", "192", "--processes", "3",
                  "--calls", "3")
    assert runs["beam-shared"]["status"] == "oom-killed"  # Beam's default: a private copy per process
    for approach in ("modelshare", "beam-multi-process-shared"):  # one copy per machine
        run = runs[approach]
        assert run["status"] == "completed" and run["outputs_equal"], run
        assert run["peak_in_use_mib"] <= run["limit_mib"] and run["oom_kills"] == 0
    mapped = runs["mmap-file"]  # the peer: the file's pages in the page cache, once, reclaimable under the limit
    assert mapped["status"] == "completed" and mapped["outputs_equal"], mapped
    # one copy of the weights in all: what modelshare holds beyond the bare workers is about the model once
    shared = runs["modelshare"]
    assert shared["peak_in_use_mib"] - 3 * shared["bare_mib"] < 1.5 * shared["model_mib"]
    in_file = runs["modelshare-mapped"]  # a file-backed segment: the weights are the file's pages, as for the peer
    assert in_file["status"] == "completed" and in_file["outputs_equal"], in_file
    assert in_file["peak_in_use_mib"] < mapped["peak_in_use_mib"] + 0.25 * in_file["model_mib"]
    # below the workers plus the model, shared memory is OOM-killed; file pages are dropped and read again
    limit = round(in_file["peak_in_use_mib"] + 0.5 * in_file["model_mib"])
    tight = _suite(tmp_path / "tight", "--scenario", "3", "--framework", "torch", "--size-mib", "192", "--processes",
                   "3", "--calls", "2", "--limit-mib", str(limit), "--approaches", "modelshare", "modelshare-mapped")
    assert tight["modelshare"]["status"] == "oom-killed", tight["modelshare"]
    assert tight["modelshare-mapped"]["status"] == "completed" and tight["modelshare-mapped"]["outputs_equal"]


@needs_cgroup
def test_safetensors_mapped_by_the_peer_and_left_in_the_file_by_modelshare(tmp_path: Path) -> None:
    """``load_file`` maps a safetensors file and ``assign=True`` keeps its tensors: the peer. A
    file-backed segment leaves those weights in the file too, so modelshare holds no copy beside it."""
    runs = _suite(tmp_path, "--scenario", "3", "--framework", "safetensors", "--size-mib", "96", "--processes", "2",
                  "--calls", "2", "--approaches", "mmap-file", "modelshare-mapped")
    mapped, in_file = runs["mmap-file"], runs["modelshare-mapped"]
    for run in (mapped, in_file):
        assert run["status"] == "completed" and run["outputs_equal"], run
        assert run["model_mib"] < run["held_pss_mib"] <= run["peak_pss_mib"] + 8, "measured once all hold the model"
    assert in_file["peak_in_use_mib"] < mapped["peak_in_use_mib"] + 0.25 * in_file["model_mib"]


@needs_cgroup
def test_the_ray_peer_shares_one_copy_through_its_object_store(tmp_path: Path) -> None:
    from benchmarks.suite.approaches import why_not

    if (reason := why_not("ray-object-store", "torch")) is not None:
        pytest.skip(f"the Ray peer cannot run: {reason}")
    def ray_daemons() -> set[int]:
        return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}

    before = ray_daemons()
    runs = _suite(tmp_path, "--scenario", "3", "--framework", "torch", "--size-mib", "96", "--processes", "2",
                  "--calls", "2", "--limit-mib", "4000", "--approaches", "ray-object-store", "modelshare-mapped")
    ray, mapped = runs["ray-object-store"], runs["modelshare-mapped"]
    assert ray["status"] == "completed" and ray["outputs_equal"], ray  # the module rebuilt over the store's views
    assert mapped["status"] == "completed" and mapped["outputs_equal"], mapped
    assert ray_daemons() <= before, "the run's Ray head outlived it"


@needs_cgroup
def test_scenario_1_a_copy_per_thread_is_oom_killed_one_per_process_completes(tmp_path: Path) -> None:
    runs = _suite(tmp_path, "--scenario", "1", "--framework", "sklearn", "--size-mib", "64", "--processes", "2",
                  "--threads", "4", "--calls", "3")
    assert runs["private-per-thread"]["status"] == "oom-killed"
    for approach in ("beam-shared", "modelshare-threads"):
        assert runs[approach]["status"] == "completed" and runs[approach]["outputs_equal"], runs[approach]


@needs_cgroup
def test_scenario_2_keyed_models_under_a_byte_budget_survive_where_a_count_per_worker_is_oom_killed(
        tmp_path: Path) -> None:
    runs = _suite(tmp_path, "--scenario", "2", "--framework", "torch", "--size-mib", "96", "--processes", "4",
                  "--calls", "6")
    assert runs["beam-keyed-hint"]["status"] == "oom-killed"
    routed = runs["modelshare-router"]
    assert routed["status"] == "completed" and routed["outputs_equal"], routed
    assert routed["stats"]["loads"] + routed["stats"]["hits"] == 4 * 7  # every call of every worker got its model
    assert routed["peak_in_use_mib"] <= routed["limit_mib"]


@needs_cgroup
def test_scenario_4_exact_copies_complete_where_a_copy_per_process_is_oom_killed(tmp_path: Path) -> None:
    runs = _suite(tmp_path, "--scenario", "4", "--framework", "torch", "--size-mib", "384", "--processes", "4",
                  "--calls", "4")
    assert runs["beam-shared"]["status"] == "oom-killed"
    for approach in ("modelshare-server", "beam-model-copies"):
        assert runs[approach]["status"] == "completed" and runs[approach]["outputs_equal"], runs[approach]


def test_without_a_cgroup_peaks_are_compared_to_the_limit(tmp_path: Path) -> None:
    model = prepare_model("numpy", 16, tmp_path)
    scenario = get(3)
    results = [run_one(scenario, "modelshare", model, processes, 1, 2, 1 << 20, use_cgroup=False)
               for processes in (1, 2)]
    for result in results:
        assert not result.limit_enforced and result.status == "over-limit"  # 16 MiB of weights > a 1 MiB limit
        assert result.outputs_equal and result.peak_in_use_mib == result.peak_pss_mib > 16
        assert result.timeline and result.latency_ms["p50"] > 0
    written = report.write(results, tmp_path / "out")
    names = {p.name for p in written}
    assert {"results.md", "peak-vs-processes.png", "memory-over-time-1p.png", "memory-over-time-2p.png"} <= names
    assert "NOT enforced" in (tmp_path / "out" / "results.md").read_text()
    assert not list(Path("/dev/shm").glob("modelshare-bench-*"))  # every run cleans its segment directory


def test_reference_output_is_a_private_load(tmp_path: Path) -> None:
    model = prepare_model("sklearn", 4, tmp_path)
    from benchmarks.frameworks import FRAMEWORKS

    framework = FRAMEWORKS["sklearn"]
    assert np.array_equal(model.reference, framework.call(framework.load(model.path), framework.sample()))


def test_unknown_scenario_names_the_ones_there_are() -> None:
    with pytest.raises(ValueError, match=r"scenarios \[1, 2, 3, 4\]"):
        get(5)


@needs_cgroup
def test_keyed_beam_pipeline_budget_survives_where_beams_model_count_is_oom_killed() -> None:
    from benchmarks.studies import keyed_pipeline

    result = keyed_pipeline.run(size_mib=96, workers=4, examples=48)
    runs = {r["config"]: r for r in result["runs"]}
    assert runs["beam-hint"]["status"] == "oom-killed", runs["beam-hint"]["error"]
    budget = runs["modelshare-budget"]
    assert budget["status"] == "completed" and budget["same_predictions"], budget["error"]
    assert budget["peak_in_use_mib"] <= result["limit_mib"]


def test_ragged_study_counts_calls_and_padding() -> None:
    """The ragged study on the issue's size: Beam's batches fail, bucket is one call per length, pad
    stays within its waste bound with a handful of calls, and every output is right."""
    pytest.importorskip("torch", reason="PyTorch is not installed")
    from benchmarks.studies import ragged_batches

    rows = {row["config"]: row for row in ragged_batches.main(["--examples", "60", "--max-length", "64"],
                                                              report=lambda line: None)}
    assert "stack expects each tensor to be equal size" in rows["beam-batches-of-16"]["failed"]
    lengths = len({int(x.shape[0]) for x in ragged_batches.examples(60, 64)[0]})
    assert rows["modelshare-bucket"]["calls"] == lengths and rows["modelshare-bucket"]["computed_over_real"] == 1
    assert rows["modelshare-pad"]["calls"] < lengths / 3 and rows["modelshare-pad"]["computed_over_real"] <= 1.25
    assert rows["modelshare-pad-unbounded"]["calls"] == 4, "60 elements, calls of at most 16"
    for config in ragged_batches.CONFIGS[1:]:
        assert rows[config]["wrong_shapes"] == 0 and rows[config]["max_error"] < 1e-5, config


def test_forests_study_finds_what_shares_a_forest() -> None:
    """A small forest four ways: every way predicts right; a server holds it once, so its workers
    cost less than private ones; ONNX Runtime sessions do not share the trees."""
    pytest.importorskip("skl2onnx", reason="skl2onnx (the bench extra) is not installed")
    from benchmarks.studies import forests

    rows = {row["config"]: row for row in forests.main(["--trees", "40", "--depth", "12", "--workers", "2"],
                                                       report=lambda line: None)}
    assert all(row["right"] for row in rows.values()), rows
    assert rows["modelshare-server"]["pss_mib"] < rows["private"]["pss_mib"]
    assert rows["modelshare-server"]["gained_mib"] < rows["private"]["gained_mib"] / 4


@pytest.mark.parametrize("framework", ["torch", "safetensors", "onnx", "sklearn"])
def test_a_peers_worker_never_imports_modelshare(framework: str, tmp_path: Path) -> None:
    """A peer's process pays for nothing of modelshare's (its import is ~6 MiB per process): a
    worker running the memory-mapped file must not have imported it."""
    model = prepare_model(framework, 1, tmp_path)
    code = ("import sys, time; from benchmarks.suite.approaches import APPROACHES, RunSpec; "
            "from benchmarks.frameworks import FRAMEWORKS; "
            f"spec = RunSpec({framework!r}, {str(model.path)!r}, 'mmap-file', 1, 1, 'k', {str(tmp_path)!r}, "
            f"{str(tmp_path)!r}, time.time(), processes=2); "
            f"APPROACHES['mmap-file'](spec)(0, FRAMEWORKS[{framework!r}].sample()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'modelshare'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
