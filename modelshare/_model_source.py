"""Where ``SharedModel.from_onnx`` / ``from_tensorrt`` get a model: a file, or its bytes.

The loader only runs in the one process that publishes; everyone else attaches. It is a small
picklable object, so a SharedModel built from a path carries the path, not the model.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Union

from ._host.directory import make_key

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
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
        return f"{prefix}-{hashlib.blake2b(self.data, digest_size=6).hexdigest()}"

    @property
    def files(self) -> tuple[Path, ...]:
        """The file the model is read from (its identity versions the model); none for bytes."""
        return () if self.path is None else (self.path,)
