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
