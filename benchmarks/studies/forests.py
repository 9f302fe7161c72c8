"""What shares a scikit-learn forest: its trees are copied when rebuilt, so which way pays once?

A ``RandomForestClassifier`` keeps each tree's nodes in a Cython ``Tree`` whose unpickling copies
the node array into memory of its own: shared pages come back private in every process
(``CopiedOnLoadWarning``). Four spawned workers get the forest each way and predict; per way,
the total PSS of the workers (and of the server, where there is one), the private memory a worker
gained getting the model, the median time of one ``predict`` of 64 rows, and whether every
prediction equals the forest's own:

* ``private``: every worker unpickles its own forest (``joblib.load``);
* ``modelshare-processes``: ``SharedModel(share="processes")``: the generic codec (trees copied);
* ``modelshare-server``: ``share="server"``: one forest in a server process, calls over a socket;
* ``onnx-private`` / ``onnx-modelshare``: the forest converted with skl2onnx, one ONNX Runtime
  session per worker, on a private model or over a shared segment (``SharedModel.from_onnx``).

Run: ``python -m benchmarks.studies.forests [--trees 200] [--depth 18] [--workers 4]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from modelshare import SharedModel, memory

from .. import ROOT

CONFIGS = ["private", "modelshare-processes", "modelshare-server", "onnx-private", "onnx-modelshare"]
_ROWS, _FEATURES = 64, 32


def inputs() -> np.ndarray:
    """The rows every worker predicts: the same in every process."""
    return np.random.default_rng(7).random((_ROWS, _FEATURES), dtype=np.float32)


def train(trees: int, depth: int) -> Any:
    """A random forest on random data: deep trees, so the node arrays are what weighs."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = rng.random((20_000, _FEATURES), dtype=np.float32)
    y = (x[:, 0] + rng.random(20_000) > 1.0).astype(np.int64)
    return RandomForestClassifier(n_estimators=trees, max_depth=depth, n_jobs=2, random_state=0).fit(x, y)


def _anon_mib() -> float:
    return memory.anonymous_bytes() / 2**20


def _private_forest(path: str) -> Callable[[np.ndarray], np.ndarray]:
    import joblib

    forest = joblib.load(path)
    return forest.predict


def _onnx_session(path: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def worker(config: str, forest_path: str, onnx_path: str, directory: str, ready: Any, done: Any) -> None:
    """One worker: get the model the ``config`` way, predict, report, hold until ``done``."""
    warnings.simplefilter("ignore")
    before = _anon_mib()
    shared: Optional[SharedModel] = None
    if config == "private":
        predict = _private_forest(forest_path)
    elif config == "onnx-private":
        predict = _onnx_session(onnx_path)
    elif config == "onnx-modelshare":
        shared = SharedModel.from_onnx(onnx_path, key="forest-onnx", directory=directory)
        session = shared.acquire()
        predict = lambda x: session.run(None, {"x": x})[0]  # noqa: E731
    else:
        import joblib

        shared = SharedModel(lambda: joblib.load(forest_path), key="forest", directory=directory,
                             share="server" if config == "modelshare-server" else "processes")
        predict = shared.acquire().predict
    x = inputs()
    predictions = np.asarray(predict(x))
    gained = _anon_mib() - before
    times = []
    for _ in range(20):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    ready.put(json.dumps({"predictions": predictions.tolist(), "gained_mib": gained,
                          "call_ms": 1e3 * statistics.median(times)}))
    done.wait(600)


def _server_pids(directory: str) -> list[int]:
    listed = subprocess.run([sys.executable, "-m", "modelshare", "--dir", directory, "ls", "--json", "--servers"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    return [server["pid"] for server in json.loads(listed.stdout)]


def run_config(config: str, forest_path: str, onnx_path: str, workers: int, expected: list[int]) -> dict[str, Any]:
    """Start ``workers`` spawned workers the ``config`` way; what they cost and how fast they answer."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        directory = str(Path(folder) / "modelshare")
        ready, done = spawn.Queue(), spawn.Event()
        processes = [spawn.Process(target=worker, args=(config, forest_path, onnx_path, directory, ready, done))
                     for _ in range(workers)]
        for process in processes:
            process.start()
        reports = [json.loads(ready.get(timeout=600)) for _ in processes]
        pids = [p.pid for p in processes] + (_server_pids(directory) if config == "modelshare-server" else [])
        pss = memory.total_pss(pids)
        done.set()
        for process in processes:
            process.join(120)
    return {"config": config, "pss_mib": pss / 2**20,
            "gained_mib": statistics.median(r["gained_mib"] for r in reports),
            "call_ms": statistics.median(r["call_ms"] for r in reports),
            "right": all(r["predictions"] == expected for r in reports)}


def main(argv: Optional[list[str]] = None, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    import joblib
    from skl2onnx import to_onnx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    args = parser.parse_args(argv)
    forest = train(args.trees, args.depth)
    expected = forest.predict(inputs()).tolist()
    nodes = sum(tree.tree_.node_count for tree in forest.estimators_)
    with tempfile.TemporaryDirectory() as files:
        forest_path, onnx_path = str(Path(files) / "forest.joblib"), str(Path(files) / "forest.onnx")
        joblib.dump(forest, forest_path)
        model = to_onnx(forest, inputs()[:1], options={id(forest): {"zipmap": False}}, target_opset=17)
        model.graph.input[0].name = "x"
        for node in model.graph.node:
            node.input[:] = ["x" if name == "X" else name for name in node.input]
        Path(onnx_path).write_bytes(model.SerializeToString())
        del forest, model
        rows = [run_config(config, forest_path, onnx_path, args.workers, expected) for config in args.configs]
        report(f"RandomForestClassifier: {args.trees} trees, depth {args.depth}, {nodes} nodes; joblib file "
               f"{Path(forest_path).stat().st_size / 2**20:.0f} MiB, ONNX {Path(onnx_path).stat().st_size / 2**20:.0f} "
               f"MiB; {args.workers} spawned workers, predict of {_ROWS} rows\n")
    report("| way | total PSS MiB | private MiB a worker gained | predict ms (median) | right |")
    report("|---|---|---|---|---|")
    for row in rows:
        report(f"| {row['config']} | {row['pss_mib']:.0f} | {row['gained_mib']:.0f} | {row['call_ms']:.2f} "
               f"| {row['right']} |")
    return rows


if __name__ == "__main__":
    main()
