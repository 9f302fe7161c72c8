"""Fixtures shared by the test suite: a private segment directory that must end up empty.

The suite runs with ``MODELSHARE_LINGER=0`` (its children inherit it): its tests check what a
release frees, at once; the linger itself, default included, is tested in ``tests/modes/test_linger.py``.
It runs with ``MODELSHARE_DIR`` set to a directory of its own, so that no test writes in the
user's default directory (the Beam batching tests did: a counts file in ``/dev/shm/modelshare-<uid>``).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from modelshare import _process

from .support import leftovers

os.environ["MODELSHARE_LINGER"] = "0"
# a test that does not ask for ``shm_dir`` still never touches the user's own directory
_SESSION_DIRECTORY = Path("/dev/shm") / f"modelshare-tests-{uuid.uuid4().hex[:12]}"
os.environ["MODELSHARE_DIR"] = str(_SESSION_DIRECTORY)


@pytest.fixture(scope="session", autouse=True)
def _session_directory() -> Iterator[None]:
    """The directory of tests without ``shm_dir``: removed with the session."""
    yield
    shutil.rmtree(_SESSION_DIRECTORY, ignore_errors=True)


@pytest.fixture
def shm_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh segment directory on /dev/shm; the test fails if it leaves any file behind."""
    directory = Path("/dev/shm") / f"modelshare-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MODELSHARE_DIR", str(directory))
    yield directory
    gc.collect()  # a test's frame kept in a cycle by a caught exception still maps its models until now
    _process.settle()  # instances collected just now are released by modelshare's reaper thread
    leftover = leftovers(directory)
    shutil.rmtree(directory, ignore_errors=True)
    assert leftover == [], f"the test left files in the segment directory: {leftover}"


@pytest.fixture
def spawn() -> multiprocessing.context.SpawnContext:
    """The spawn start method: real fresh processes, as Beam's workers and process pools use."""
    return multiprocessing.get_context("spawn")
