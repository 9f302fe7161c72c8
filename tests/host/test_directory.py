"""File names in a segment directory: one way to make them, one way to read them back."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelshare import InvalidKeyError
from modelshare._host.directory import SegmentName, parse, scan


@pytest.mark.parametrize("key", ["m", "a.seg.tmp-1", "x-", "v1.2=+_", "a.lock", "k" * 128])
def test_every_file_of_a_model_version_reads_back_as_that_version(tmp_path: Path, key: str) -> None:
    name = SegmentName.for_model(tmp_path, key, "0123456789abcdef")
    paths = {"segment": name.seg_path, "lock": name.lock_path, "temporary": name.temporary_path()}
    for kind, path in paths.items():
        entry = parse(tmp_path, path.name)
        assert entry is not None and entry.kind == kind and entry.name == name and entry.name.key == key
    for owner, suffix in (("copy0", ".srv"), ("copy12", ".sock"), ("gpu-0a1b2c3d4e5f", ".gpu"), ("copy1", ".start")):
        entry = parse(tmp_path, name.owner_path(owner, suffix).name)
        assert entry is not None and (entry.kind, entry.owner, entry.owner_kind) == ("owner", owner, suffix)


@pytest.mark.parametrize("foreign", ["poetry.lock", "yarn.lock", "labels_0001.seg", "Cargo.lock", "notes.txt",
                                     "a--XYZ.seg", "a--01.seg.bak", "--01.seg", "a----01.seg", ".a--01.seg",
                                     "router.ledger", "a--01.copyx.srv", "a--01.gpu-.gpu", "a--01.seg.tmp-"])
def test_names_modelshare_does_not_make_are_not_read_as_its_own(tmp_path: Path, foreign: str) -> None:
    assert parse(tmp_path, foreign) is None


def test_scan_lists_only_modelshare_files(tmp_path: Path) -> None:
    name = SegmentName.for_model(tmp_path, "m", "00ff")
    for path in (name.seg_path, name.lock_path, tmp_path / "poetry.lock", tmp_path / "x.seg"):
        path.touch()
    assert sorted(e.path.name for e in scan(tmp_path)) == ["m--00ff.lock", "m--00ff.seg"]
    assert name.temporaries() == []
    assert scan(tmp_path / "missing") == []


def test_keys_that_cannot_name_a_file_are_refused(tmp_path: Path) -> None:
    for bad in ["", "a/b", "a--b", ".hidden", "k" * 129, "sp ace"]:
        with pytest.raises(InvalidKeyError):
            SegmentName.for_model(tmp_path, bad, "00")


@settings(max_examples=300)
@given(key=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,60}", fullmatch=True).filter(lambda k: "--" not in k),
       version=st.from_regex(r"[0-9a-f]{1,16}", fullmatch=True))
def test_no_key_can_pass_for_another_models_file(key: str, version: str) -> None:
    """The name grammar is unambiguous (keys have no '--', versions are hex, suffixes are anchored
    at the end), so keys need no further refusal: whatever a key holds ('.seg.tmp-', '.lock',
    '.copy0'), each file of its version reads back as that version and that kind, and no other."""
    directory = Path("/d")
    name = SegmentName.for_model(directory, key, version)
    files = {"segment": name.seg_path, "lock": name.lock_path, "temporary": name.temporary_path(),
             "owner": name.owner_path("copy3", ".srv")}
    for kind, path in files.items():
        entry = parse(directory, path.name)
        assert entry is not None and entry.kind == kind and entry.name == name
