"""Bad input: each case is a clear exception saying what and what to do, and leaks no file."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from modelshare import (
    EncodeError,
    InvalidKeyError,
    LoaderError,
    SegmentCorruptedError,
    SegmentDirectoryError,
    SharedModel,
    Threads,
    gc_segments,
)

from .support import leftovers


class _Flaky:
    """Raises on its first call, returns a model on the next."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        if self.calls == 1:
            raise FileNotFoundError("weights.npz")
        return {"w": np.arange(2048.0)}


@pytest.mark.parametrize("share", ["threads", "processes"])
def test_loader_that_raises(shm_dir: Path, share: str) -> None:
    loader = _Flaky()
    shared = SharedModel(loader, key="flaky", share=share)
    with pytest.raises(LoaderError, match=r"loader for model 'flaky' raised FileNotFoundError: weights.npz.*"
                                          r"next acquire\(\) runs it again") as info:
        shared.acquire()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, RuntimeError), \
        "code that catches what the loader raises (or Beam's RuntimeError) must catch the LoaderError"
    assert not shm_dir.exists() or leftovers(shm_dir) == []
    with shared.use() as model:  # recovers on the next acquire
        assert model["w"][-1] == 2047.0


class _NeedsTwoArguments(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


@pytest.mark.parametrize("cause", [FileNotFoundError("w.pt"), KeyError("layer.3"), ValueError("bad shape"),
                                   _NeedsTwoArguments("w.pt", "truncated")], ids=type)
def test_a_loader_error_is_what_the_loader_raised_and_survives_pickling(cause: Exception) -> None:
    error = LoaderError.caused_by(f"the loader raised {cause!r}", cause)
    assert isinstance(error, LoaderError) and isinstance(error, RuntimeError) and error.__cause__ is cause
    if not isinstance(cause, _NeedsTwoArguments):  # a class a message alone cannot build: plain LoaderError
        assert isinstance(error, type(cause))
    assert str(error) == f"the loader raised {cause!r}"
    again = pickle.loads(pickle.dumps(error))  # a worker's error, sent to its parent
    assert type(again) is type(error) and str(again) == str(error)


def test_unpicklable_model(shm_dir: Path) -> None:
    shared = SharedModel(lambda: {"w": np.ones(4096), "lock": threading.Lock()}, key="unpicklable")
    with pytest.raises(EncodeError, match=r"cannot be pickled.*share='threads'.*register_codec"):
        shared.acquire()
    assert leftovers(shm_dir) == []
    with SharedModel(lambda: threading.Lock(), key="unpicklable", share="threads").use() as lock:
        assert lock.acquire(blocking=False)  # threads mode pickles nothing: fine


@pytest.mark.parametrize("key", ["", "../etc/passwd", "a/b", "has space", "-dash", "a--b", "x" * 129, ".hidden", None])
def test_key_with_path_characters(key) -> None:
    with pytest.raises(InvalidKeyError, match="cannot name a segment: use 1-128 characters"):
        SharedModel(lambda: 1, key=key)


def test_share_and_loader_checked() -> None:
    with pytest.raises(ValueError, match="share must be 'threads', 'processes', 'server', or modelshare.Threads"):
        SharedModel(lambda: 1, key="k", share="machine")
    with pytest.raises(TypeError, match="loader must be a zero-argument callable"):
        SharedModel(np.ones(3), key="k")
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0, or None"):
        SharedModel(lambda: 1, key="k", timeout=-1)
    with pytest.raises(ValueError, match="instances must be a positive int"):
        Threads(instances=0)


def test_release_of_foreign_object(shm_dir: Path) -> None:
    shared = SharedModel(lambda: {"w": np.ones(4096)}, key="foreign")
    model = shared.acquire()
    with pytest.raises(ValueError, match="did not hand out"):
        shared.release({"w": np.ones(4096)})
    shared.release(model)
    with pytest.raises(ValueError, match="more releases than acquires"):
        shared.release(model)


def _warm_segment(shm_dir: Path) -> SharedModel:
    shared = SharedModel(lambda: {"w": np.arange(100_000.0)}, key="warm", keep_warm=True)
    with shared.use():
        pass
    assert shared.segment_name.seg_path.exists(), "keep_warm keeps the segment after its last holder"
    return shared


@pytest.mark.parametrize("damage", ["truncate", "header", "magic-version"])
def test_corrupted_segment(shm_dir: Path, damage: str) -> None:
    shared = _warm_segment(shm_dir)
    path = shared.segment_name.seg_path
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
        expected = r"bytes long, its header says"
    elif damage == "header":
        with open(path, "r+b") as f:
            f.seek(80)
            f.write(b"\xff\xff\xff")
        expected = "header checksum mismatch"
    else:
        with open(path, "r+b") as f:
            f.seek(8)
            f.write((99).to_bytes(4, "little"))
        expected = "has format version 99"
    with pytest.raises(SegmentCorruptedError, match=expected + r".*modelshare gc --all"):
        shared.acquire()
    assert gc_segments(shm_dir) == [], "gc keeps warm segments unless asked"
    assert path in gc_segments(shm_dir, include_warm=True)
    with shared.use() as model:  # reloaded from the loader
        assert model["w"][-1] == 99_999.0
    del model
    gc_segments(shm_dir, include_warm=True)


def test_verify_names_the_damaged_buffer(shm_dir: Path) -> None:
    from modelshare._host.format import try_map

    shared = _warm_segment(shm_dir)
    path = shared.segment_name.seg_path
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\x01" * 8)
    mapping = try_map(path)
    with pytest.raises(SegmentCorruptedError, match=r"buffer 0 \(800000 bytes\) does not match its checksum"):
        mapping.verify()
    mapping.close()
    gc_segments(shm_dir, include_warm=True)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to run out of room (needs root): {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_directory_without_room(tiny_tmpfs: Path) -> None:
    directory = tiny_tmpfs / "segments"
    shared = SharedModel(lambda: {"w": np.ones((4 << 20) // 8)}, key="big", directory=directory)
    with pytest.raises(SegmentDirectoryError, match=r"no room for a 4\.0 MiB segment in .*MiB free.*MODELSHARE_DIR"):
        shared.acquire()
    assert leftovers(directory) == []
    small = SharedModel(lambda: {"w": np.ones(1024)}, key="small", directory=directory)
    with small.use() as model:  # the directory still works for what fits
        assert model["w"].sum() == 1024
    del model  # released and no longer referenced: only then unmapped, and the segment unlinked
    assert leftovers(directory) == []


def test_directory_without_permission(tmp_path: Path) -> None:
    directory = Path("/dev/shm") / f"modelshare-test-noperm-{uuid.uuid4().hex[:8]}"
    directory.mkdir(mode=0o700)
    try:
        code = (
            "import os, sys\n"
            "import numpy as np\n"
            "from modelshare import SharedModel, SegmentDirectoryError\n"
            f"m = SharedModel(lambda: np.ones(4096), key='k', directory={str(directory / 'sub')!r})\n"
            "if os.getuid() == 0: os.setgid(65534); os.setuid(65534)  # root passes every permission check\n"
            "try:\n    m.acquire()\n"
            "except SegmentDirectoryError as e:\n    print(e); sys.exit(3)\n"
        )
        if os.getuid() != 0:
            directory.chmod(0o500)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert run.returncode == 3, run.stderr
        assert "cannot create the segment directory" in run.stdout and "MODELSHARE_DIR" in run.stdout
        assert leftovers(directory) == []
    finally:
        directory.chmod(0o700)
        directory.rmdir()


def test_directory_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(SegmentDirectoryError, match="MODELSHARE_DIR"):
        SharedModel(lambda: np.ones(8), key="k", directory=not_a_dir).acquire()


def test_write_to_shared_weights_is_refused(shm_dir: Path) -> None:
    with SharedModel(lambda: {"w": np.zeros(4096)}, key="ro").use() as model:
        with pytest.raises(ValueError, match="read-only"):
            model["w"][0] = 1.0
        assert model["w"][0] == 0.0


def test_waiting_longer_than_timeout(shm_dir: Path, tmp_path: Path, spawn) -> None:
    import functools

    from modelshare import AcquireTimeoutError

    from .support import workers as _workers

    counter = str(tmp_path / "loads")
    slow = SharedModel(functools.partial(_workers.make_mlp, 4, width=512, counter=counter, delay=30),
                       key="slow", timeout=0.5)
    results, done = spawn.Queue(), spawn.Event()
    loader = spawn.Process(target=_workers.use_worker, args=(slow, None, results, done), daemon=True)
    loader.start()
    try:
        deadline = time.monotonic() + 60
        while not _workers.loads_counted(counter):  # until the other process is inside its loader
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(AcquireTimeoutError, match=r"waited 0.5 s for the model at .*slow--.*Raise timeout="):
            slow.acquire()
    finally:
        loader.kill()
        loader.join(30)
    gc_segments(shm_dir)


def test_files_are_private_to_the_user(shm_dir: Path) -> None:
    with SharedModel(lambda: {"w": np.ones(4096)}, key="modes").use():
        assert shm_dir.stat().st_mode & 0o777 == 0o700
        modes = {p.name.rsplit(".", 1)[-1]: p.stat().st_mode & 0o777 for p in shm_dir.iterdir()}
        assert modes == {"seg": 0o600, "lock": 0o600, "counts": 0o600}


def test_make_key_from_any_text_is_a_valid_key() -> None:
    from modelshare import make_key
    from modelshare._host.directory import validate_key

    for text in ["my model.v2", "a---b", "--x", ".hidden", "=+", "ü" * 300, ""]:
        assert validate_key(make_key(text, "fallback"))
    assert make_key("my model.v2", "f") == "my_model.v2" and make_key("", "f") == "f"
    with pytest.raises(InvalidKeyError):
        make_key("", "no/fallback")


def test_beam_adapter_without_beam_says_what_to_install() -> None:
    code = "import sys; sys.modules['apache_beam'] = None\nimport beam_adapter"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert 'ImportError: beam_adapter needs Apache Beam: pip install "modelshare[beam]"' in run.stderr, run.stderr
