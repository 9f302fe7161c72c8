"""The generic codec through a real segment: round-trips equal, arrays come back as views."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelshare._host import format as segment_format
from modelshare._host.directory import SegmentName
from modelshare.codecs import Codec, Encoded, codec_for, get_codec, register_codec
from modelshare.codecs.generic import GenericCodec


@dataclasses.dataclass
class Box:
    """A user class holding anything."""

    content: Any
    label: str = "box"


def roundtrip(obj: Any, directory: Path, codec: Codec) -> tuple[Any, segment_format.Mapping]:
    """Encode into a real segment file, map it, decode from the mapping."""
    directory.mkdir(exist_ok=True)
    name = SegmentName(directory, "prop--0")
    path = name.seg_path
    encoded = codec.encode(obj)
    segment_format.write_segment(path, name.temporary_path(), {"codec": codec.name, "views": encoded.views}, encoded,
                                 keep_warm=False)
    mapping = segment_format.try_map(path)
    try:
        return codec.decode(mapping.skeleton, mapping.buffers), mapping
    finally:
        path.unlink()


def assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        if a.dtype.kind in "mM":  # numpy's own pickling turns >M8 into native order: compare values
            a, b = (x.astype(x.dtype.newbyteorder("=")) for x in (a, b))
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, Box):
        assert a.label == b.label
        assert_same(a.content, b.content)
    else:
        assert a == b


def _layout(array: np.ndarray, how: str) -> np.ndarray:
    if how == "fortran":
        return np.asfortranarray(array)
    if how == "strided" and array.ndim:
        return array[::2]
    if how == "transposed" and array.ndim > 1:
        return array.T
    if how == "reversed" and array.ndim:
        return array[::-1]
    return array


dtypes = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(max_len=4),
    hnp.unicode_string_dtypes(max_len=4),
    st.just(np.dtype([("a", "<i4"), ("b", "<f8", (2,))])),
    st.sampled_from([np.dtype(">i8"), np.dtype(">f4"), np.dtype("float16")]),
)
arrays = st.builds(
    _layout,
    hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    st.sampled_from(["c", "fortran", "strided", "transposed", "reversed"]),
)
leaves = st.one_of(arrays, st.integers(), st.text(max_size=4), st.none(), st.floats(allow_nan=False))
models = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=3), children, max_size=3),
        st.tuples(children, children),
        st.builds(Box, children),
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=models)
def test_any_nesting_of_arrays_roundtrips_equal(model: Any, tmp_path: Path) -> None:
    back, mapping = roundtrip(model, tmp_path / "seg", GenericCodec(min_shared_bytes=0))
    assert_same(model, back)
    del back
    mapping.close()


def _address_range(mapping: segment_format.Mapping) -> tuple[int, int]:
    start = np.frombuffer(mapping._whole, dtype=np.uint8).ctypes.data
    return start, start + mapping.nbytes


def test_arrays_are_zero_copy_views_of_the_segment(tmp_path: Path) -> None:
    model = {"w": np.random.default_rng(0).random((512, 512)), "f": np.asfortranarray(np.ones((64, 32))),
             "box": Box(np.arange(10_000, dtype=np.int8)), "small": np.ones(3)}
    back, mapping = roundtrip(model, tmp_path / "seg", GenericCodec())
    low, high = _address_range(mapping)
    for name in ("w", "f"):
        assert low <= back[name].ctypes.data < high, f"{name} was copied out of the segment"
        assert not back[name].flags.writeable
    assert low <= back["box"].content.ctypes.data < high
    assert back["f"].flags.f_contiguous
    assert len(mapping.buffers) == 3, "an 24-byte array stays inside the skeleton"
    assert_same(model, back)


def test_non_contiguous_array_goes_out_of_band(tmp_path: Path) -> None:
    base = np.arange(1 << 16, dtype=np.float64).reshape(256, 256)
    model = {"strided": base[::2, ::3], "same": None}
    model["same"] = model["strided"]
    back, mapping = roundtrip(model, tmp_path / "seg", GenericCodec())
    low, high = _address_range(mapping)
    assert low <= back["strided"].ctypes.data < high
    assert back["same"] is back["strided"], "one array referenced twice stays one array"
    np.testing.assert_array_equal(back["strided"], base[::2, ::3])


def test_memory_mapped_array_is_shared_as_a_plain_array(tmp_path: Path) -> None:
    original = np.random.default_rng(0).random((256, 256))
    np.save(tmp_path / "w.npy", original)
    model = {"w": np.load(tmp_path / "w.npy", mmap_mode="r")}  # what joblib.load(mmap_mode="r") hands back
    assert isinstance(model["w"], np.memmap)
    back, mapping = roundtrip(model, tmp_path / "seg", GenericCodec())
    low, high = _address_range(mapping)
    assert type(back["w"]) is np.ndarray and low <= back["w"].ctypes.data < high
    assert len(mapping.skeleton) < 4096, "the array went into the skeleton"
    np.testing.assert_array_equal(back["w"], original)


def test_estimate_matches_encoding() -> None:
    codec = GenericCodec()
    model = Box({"a": np.ones((300, 300)), "b": [np.zeros(5000, np.int16)]})
    assert codec.estimate(model) == codec.encode(model).nbytes


def test_registry_picks_codec_by_type_name_without_importing() -> None:
    class Special:
        pass

    class SpecialCodec(GenericCodec):
        name = "special-test"

    assert codec_for(Special()).name == "generic"
    register_codec(SpecialCodec(), types=[f"{Special.__module__}.{Special.__qualname__}"])

    class Child(Special):
        pass

    assert codec_for(Child()).name == "special-test", "subclasses use their base's codec"
    assert get_codec("special-test").name == "special-test"
    with pytest.raises(LookupError, match="no codec named 'nope'"):
        get_codec("nope")
    with pytest.raises(ValueError, match="pass name="):
        register_codec("some.module:Codec")


def test_encoded_nbytes() -> None:
    encoded = Encoded(b"abc", [memoryview(b"12345")])
    assert encoded.nbytes == 8


def test_a_released_model_unmaps_as_soon_as_it_is_dropped(shm_dir: Path) -> None:
    # No reference cycle may keep the segment's views alive until the cyclic GC runs: a model that
    # is released and dropped must unmap at once, or an evicted segment's memory stays in use.
    import functools
    import gc

    from modelshare import SharedModel

    def mapped() -> int:
        return sum(1 for line in open("/proc/self/maps") if str(shm_dir) in line)

    shared = SharedModel(functools.partial(dict, w=np.ones(1 << 20), box=Box(np.ones(1 << 16))), key="drop",
                         directory=shm_dir, keep_warm=True)
    gc.disable()
    try:
        model = shared.acquire()
        assert mapped() == 1
        shared.release(model)
        del model
        assert mapped() == 0
    finally:
        gc.enable()
    from modelshare import gc_segments

    gc_segments(shm_dir, include_warm=True)
