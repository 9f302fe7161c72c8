"""Where a model comes from: a file or its bytes (``from_onnx``, ``from_tensorrt``), and the
identity of the files a model is read from, which versions it.

:class:`FileOrBytes` is the loader of ``SharedModel.from_onnx`` / ``from_tensorrt``. It only runs
in the one process that publishes; everyone else attaches. It is a small picklable object, so a
SharedModel built from a path carries the path, not the model.

Files as versions: a loader that reads ``ranker.pt`` fingerprints the same whether the file holds
last week's weights or today's, so while any process holds last week's segment, new processes
would attach to it and serve stale weights without a word. The identity of each file -- device,
inode, size and modification time, what changes when a file is rewritten or replaced (``os.replace``
of a new file, a deploy's symlink switch) -- goes into the model's version instead: new weights on
disk are a new version, loaded once beside the old one, which goes when its last holder lets go.
Which files: ``SharedModel(watch=[...])``, else the loader's ``files`` attribute (the loaders in
``modelshare.loaders`` and :class:`FileOrBytes` have one).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from ._fingerprint import blake2b
from ._host.directory import make_key

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
PathLike = Union[str, "os.PathLike[str]"]
_LARGE_BYTES = 64 << 20


class FileOrBytes:
    """A zero-argument loader: ``from_path(path)`` or ``from_bytes(data)``, whichever was given."""

    def __init__(self, source: Source, what: str, from_path: Callable[[Path], Any],
                 from_bytes: Callable[[bytes], Any]) -> None:
        self.what, self.from_path, self.from_bytes = what, from_path, from_bytes
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path, self.data = None, bytes(source)
            if len(self.data) > _LARGE_BYTES:
                warnings.warn(
                    f"a {what} of {len(self.data) >> 20} MiB given as bytes travels with every pickled "
                    "SharedModel; pass its path instead", stacklevel=3)
        else:
            self.path, self.data = Path(source), None
            if not self.path.is_file():
                raise FileNotFoundError(f"no {what} at {self.path}; pass the path of a file or its bytes")

    def __call__(self) -> Any:
        return self.from_bytes(self.data) if self.data is not None else self.from_path(self.path)

    def default_key(self, prefix: str) -> str:
        """The file's stem made key-safe, or ``<prefix>-<hash of the bytes>``."""
        if self.path is not None:
            return make_key(self.path.stem, prefix)
        return f"{prefix}-{blake2b(self.data, digest_size=6).hexdigest()}"

    @property
    def files(self) -> tuple[Path, ...]:
        """The file the model is read from (its identity versions the model); none for bytes."""
        return () if self.path is None else (self.path,)


def watched_files(watch: Optional[Iterable[PathLike]], loader: Any) -> tuple[str, ...]:
    """The absolute paths to watch: ``watch`` if given, else ``loader.files`` (none if it has none)."""
    if watch is None:
        watch = getattr(loader, "files", None) or ()
    if isinstance(watch, (str, bytes, os.PathLike)):
        raise TypeError(f"watch must be a list of paths, not one path ({watch!r}): write watch=[{watch!r}]")
    paths = tuple(os.path.abspath(os.fspath(path)) for path in watch)
    for path in paths:
        if not isinstance(path, str):
            raise TypeError(f"watch takes paths as str or os.PathLike, not {path!r}")
    return paths


def files_identity(paths: Sequence[str]) -> str:
    """A digest of each file's device, inode, size and mtime (symlinks followed), in order."""
    digest = blake2b(digest_size=16)
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"the model's watched file {path} does not exist; the loader reads it (or "
                                    "watch= names it): create it, or fix the path") from None
        digest.update(f"{path}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()
