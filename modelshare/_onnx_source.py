"""Where ``SharedModel.from_onnx`` gets a model: a path (external data included) or bytes.

The loader only runs in the one process that publishes; everyone else attaches. It is a small
picklable object, so a SharedModel built from a path carries the path, not the model.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Union

Source = Union[str, os.PathLike, bytes]
_LARGE_BYTES = 64 << 20


class OnnxSource:
    """A zero-argument loader that returns the ``onnx.ModelProto`` of a path or of bytes."""

    def __init__(self, source: Source) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.path, self.data = None, bytes(source)
            if len(self.data) > _LARGE_BYTES:
                warnings.warn(
                    f"an ONNX model of {len(self.data) >> 20} MiB given as bytes travels with every pickled "
                    "SharedModel; pass its path to from_onnx instead", stacklevel=3)
        else:
            self.path, self.data = Path(source), None
            if not self.path.is_file():
                raise FileNotFoundError(f"no ONNX model at {self.path}; pass the path of an .onnx file or its bytes")

    def __call__(self) -> Any:
        import onnx

        if self.data is not None:
            return onnx.load_from_string(self.data)
        return onnx.load(str(self.path), load_external_data=True)

    def default_key(self) -> str:
        if self.path is not None:
            return re.sub(r"[^A-Za-z0-9_.=+-]", "_", self.path.stem)[:100].lstrip(".-") or "onnx-model"
        return f"onnx-{hashlib.blake2b(self.data, digest_size=6).hexdigest()}"

    def version(self) -> str:
        """Changes when the model does: content hash for bytes, size and mtime for a file."""
        if self.data is not None:
            return hashlib.blake2b(self.data, digest_size=16).hexdigest()
        st = self.path.stat()
        return f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
