"""The files a model is loaded from, and their identity: what versions a model read from files.

The problem: a loader that reads ``ranker.pt`` fingerprints the same whether the file holds last
week's weights or today's, so while any process holds last week's segment, new processes attach
to it and serve stale weights without a word. The identity of each file -- device, inode, size and
modification time, what changes when a file is rewritten or replaced (``os.replace`` of a new
file, a deploy's symlink switch) -- goes into the model's version instead: new weights on disk are
a new version, loaded once beside the old one, which goes when its last holder lets go.

Which files: ``SharedModel(watch=[...])``, else the loader's ``files`` attribute (the loaders in
``modelshare.loaders`` and the ``from_onnx``/``from_tensorrt`` sources have one).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]


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
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"the model's watched file {path} does not exist; the loader reads it (or "
                                    "watch= names it): create it, or fix the path") from None
        digest.update(f"{path}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()
