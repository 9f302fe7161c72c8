"""Corrupted segments: every byte that decides how a segment is read is checked on attach, so a
flip there is a clear SegmentCorruptedError -- never a wrong model, a raw unpickling error or a hang.
The weights are checked on demand (``Processes(verify=True)``, ``modelshare verify``)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelshare import Processes, SegmentCorruptedError, SharedModel
from modelshare._host.format import PREAMBLE_SIZE

from ..support import ROOT


def _model() -> dict:
    return {"w": np.arange(2048, dtype=np.float32), "b": np.ones(4096), "name": "ranker", "layers": [3, 1, 4]}


def _same(a: dict, b: dict) -> bool:
    return (a.keys() == b.keys() and a["name"] == b["name"] and a["layers"] == b["layers"]
            and np.array_equal(a["w"], b["w"]) and np.array_equal(a["b"], b["b"]))


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[SharedModel, bytes, int]:
    """A warm segment, its bytes, and where its checked part (preamble, header, skeleton) ends."""
    directory = tmp_path_factory.mktemp("corrupt")
    os.chmod(directory, 0o700)
    shared = SharedModel(_model, key="fuzz", directory=directory, keep_warm=True)
    with shared.use():
        pass
    data = shared.segment_name.seg_path.read_bytes()
    header_len, data_offset = struct.unpack_from("<QQ", data, 16)
    import json

    skeleton = json.loads(data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len])["skeleton"]
    return shared, data, data_offset + skeleton["offset"] + skeleton["nbytes"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=3))
def test_a_flip_in_the_checked_part_is_an_error_never_a_wrong_model(published: tuple[SharedModel, bytes, int],
                                                                   flips: list[tuple[int, int]]) -> None:
    shared, original, checked_end = published
    damaged = bytearray(original)
    for position, mask in flips:
        damaged[position % checked_end] ^= mask
    path = shared.segment_name.seg_path
    path.write_bytes(damaged)
    try:
        model = shared.acquire()
    except SegmentCorruptedError as exc:
        assert str(path) in str(exc) and "modelshare gc" in str(exc)
    else:
        try:  # a flip only in padding nothing reads: the model must be the model
            assert _same(model, _model()), "a damaged segment decoded into a different model"
        finally:
            shared.release(model)
            del model
    finally:
        path.write_bytes(original)


def test_the_keep_warm_flag_is_checked_too(published: tuple[SharedModel, bytes, int]) -> None:
    shared, original, _ = published
    damaged = bytearray(original)
    damaged[12] ^= 1  # flags, bit 0: keep warm
    shared.segment_name.seg_path.write_bytes(damaged)
    try:
        with pytest.raises(SegmentCorruptedError, match="preamble checksum mismatch"):
            shared.acquire()
    finally:
        shared.segment_name.seg_path.write_bytes(original)


def test_damaged_weights_are_found_when_asked(published: tuple[SharedModel, bytes, int]) -> None:
    import subprocess
    import sys

    shared, original, checked_end = published
    damaged = bytearray(original)
    damaged[-100] ^= 0xFF  # inside the last buffer: the weights
    path = shared.segment_name.seg_path
    path.write_bytes(damaged)
    verifying = SharedModel(_model, key="fuzz", directory=shared.directory, keep_warm=True,
                            share=Processes(verify=True))
    try:
        with pytest.raises(SegmentCorruptedError, match=r"buffer \d .*does not match its checksum"):
            verifying.acquire()
        out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shared.directory), "verify"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 1 and "damaged  fuzz" in out.stdout and "1 damaged segment(s)" in out.stdout
        path.write_bytes(original)
        out = subprocess.run([sys.executable, "-m", "modelshare", "--dir", str(shared.directory), "verify"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0 and "ok       fuzz" in out.stdout
    finally:
        path.write_bytes(original)
