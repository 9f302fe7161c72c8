"""Loader fingerprints: a changed loader means a new segment; the same loader, the same name."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np

from modelshare import loader_fingerprint

from .support import ROOT
from .support.workers import make_mlp

WEIGHTS = "v1.npz"


def load_weights() -> str:
    return WEIGHTS


def test_code_change_changes_the_fingerprint() -> None:
    assert loader_fingerprint(lambda: 1) != loader_fingerprint(lambda: 2)
    assert loader_fingerprint(lambda: 1) == loader_fingerprint(lambda: 1)


def test_closure_partial_and_defaults_count() -> None:
    def make(n):
        return lambda: np.zeros(n)

    assert loader_fingerprint(make(3)) != loader_fingerprint(make(4))
    assert loader_fingerprint(functools.partial(make_mlp, 8)) != loader_fingerprint(functools.partial(make_mlp, 16))
    assert loader_fingerprint(functools.partial(make_mlp, 8)) == loader_fingerprint(functools.partial(make_mlp, 8))


def test_bound_paths_count_by_their_text_and_kind() -> None:
    """Paths (what file loaders are bound to) are fed as their kind and text: the same in every
    process, and without loading cloudpickle, which pickled them before."""
    from pathlib import Path, PurePosixPath

    def fingerprint(path: object) -> str:
        return loader_fingerprint(functools.partial(np.load, path))

    assert fingerprint(Path("/models/a.npy")) == fingerprint(Path("/models/a.npy"))
    assert fingerprint(Path("/models/a.npy")) != fingerprint(Path("/models/b.npy"))
    assert fingerprint(Path("/models/a.npy")) != fingerprint(PurePosixPath("/models/a.npy"))
    code = ("import sys, functools, numpy as np; from pathlib import Path; from modelshare import loader_fingerprint; "
            "print(loader_fingerprint(functools.partial(np.load, Path('/models/a.npy'))), "
            "'cloudpickle' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=120)
    assert run.stdout.split() == [fingerprint(Path("/models/a.npy")), "False"]


def test_module_constant_counts(monkeypatch) -> None:
    before = loader_fingerprint(load_weights)
    monkeypatch.setattr(sys.modules[__name__], "WEIGHTS", "v2.npz")
    assert loader_fingerprint(load_weights) != before


def test_callable_object_state_counts() -> None:
    class Loader:
        def __init__(self, path):
            self.path = path

        def __call__(self):
            return self.path

    assert loader_fingerprint(Loader("a")) != loader_fingerprint(Loader("b"))


def test_same_loader_same_fingerprint_in_another_process() -> None:
    code = ("import functools; from modelshare import loader_fingerprint; "
            "from tests.support.workers import make_mlp; from tests.test_fingerprint import load_weights; "
            "print(loader_fingerprint(functools.partial(make_mlp, 8)), loader_fingerprint(load_weights))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=ROOT, env={"PYTHONHASHSEED": str(seed)}).stdout
            for seed in (1, 2)]
    assert runs[0] == runs[1]
    assert runs[0].split() == [loader_fingerprint(functools.partial(make_mlp, 8)), loader_fingerprint(load_weights)]


_SCRIPT = '''
import functools, multiprocessing, sys
sys.path.insert(0, {root!r})
from modelshare import loader_fingerprint

LABELS = {{"cat", "dog", "emu", "gnu", "yak"}}

class Loader:
    def __init__(self):
        self.labels = frozenset(LABELS)
        self.options = {{"tags": set(LABELS), 3: "three", ("a", 1): [1.5, None]}}

    def __call__(self):
        return self.labels

def load(labels, size):
    return sorted(labels)[:size]

def fingerprints():
    return [loader_fingerprint(functools.partial(load, LABELS, 2)), loader_fingerprint(Loader()),
            loader_fingerprint(load)]

def child(queue):
    queue.put(fingerprints())

if __name__ == "__main__":
    mine = fingerprints()
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    proc = spawn.Process(target=child, args=(queue,))
    proc.start()
    theirs = queue.get(timeout=60)
    proc.join()
    print(mine == theirs, *mine)
'''


def test_independent_interpreters_and_spawn_children_agree(tmp_path) -> None:
    """Sets (hash order), objects of classes defined in a script (cloudpickle's tracker ids), and the
    script's module seen as __mp_main__ by its spawn children: the same loader, the same fingerprint."""
    script = tmp_path / "serve.py"
    script.write_text(_SCRIPT.format(root=str(ROOT)))
    outputs = set()
    for seed in ("1", "2", "3", "4", "5"):
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=120,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout.split()
        assert out[0] == "True", "a spawn child computed another fingerprint than its parent"
        outputs.add(tuple(out[1:]))
    assert len(outputs) == 1, f"5 interpreters, {len(outputs)} fingerprints"


def test_a_loader_bound_to_a_graph_too_deep_to_walk_still_gets_a_fingerprint() -> None:
    class Node:
        def __init__(self, child: object) -> None:
            self.child = child

    deep: object = None
    for _ in range(300):
        deep = Node(deep)
    first = loader_fingerprint(functools.partial(_echo, deep))
    assert first == loader_fingerprint(functools.partial(_echo, deep))
    assert first != loader_fingerprint(functools.partial(_echo, Node(None)))


def _echo(value: object) -> object:
    return value


def test_objects_reached_by_many_paths_are_walked_once() -> None:
    """A diamond chain 40 levels deep has 2**40 paths to its bottom: walked per path, never ends."""
    class Pair:
        def __init__(self, below: object) -> None:
            self.left = self.right = below

    graph: object = None
    for _ in range(40):
        graph = Pair(graph)
    assert loader_fingerprint(functools.partial(_echo, graph)) == loader_fingerprint(functools.partial(_echo, graph))
    other: object = None
    for _ in range(40):
        other = Pair(other)
    other.left = Pair(None)  # type: ignore[attr-defined]
    assert loader_fingerprint(functools.partial(_echo, graph)) != loader_fingerprint(functools.partial(_echo, other))
