"""ONNX Runtime's packed weights, made once and shared (``prepack="shared"``).

ORT's CPU kernels (MatMul, Gemm, Conv...) repack each constant weight into a kernel-friendly
layout when a session is created, into private memory: a second copy per process. Without
prepacking the kernel packs on every call instead, 2-3x slower at small batches. ORT can also
write the packed layouts out, beside an optimized model
(``session.save_external_prepacked_constant_initializers``), and a session created over such a
model memory-maps them: its kernels compute on the file's pages. ORT packs again at session
creation and uses a saved layout only when its key matches the one it just made, so a stale or
foreign layout is never used -- at worst a process ends up with a private packed copy.

Here the publishing process has ORT optimize and pack the model once, into a temporary directory
(``TMPDIR``), and reads back the optimized model: its initializers and their packed layouts become
the segment's buffers, so every session maps the packed weights from the segment file.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["PrepackedOnnxModel", "prepack_once"]

_MODEL, _DATA = "packed.onnx", "packed.data"
PREPACKED_PREFIX = "prepacked"  # ORT's external_data key for a packed layout: "prepacked_<i>"


def parse_prepacked(value: str) -> tuple[str, list[tuple[int, int]]]:
    """ORT's packed-layout entry ``"<key>|<offset>;<length>;<checksum>|..."``: the key and each
    blob's (offset, length) in the data file."""
    key, _, blobs = value.partition("|")
    spans = []
    for blob in blobs.split("|"):
        offset, length, _checksum = blob.split(";")
        spans.append((int(offset), int(length)))
    return key, spans


def format_prepacked(key: str, blobs: list[tuple[str, int]]) -> str:
    """The entry for ``blobs`` given as (offset text, length): the inverse of :func:`parse_prepacked`."""
    return "|".join([key, *(f"{offset};{length};0" for offset, length in blobs)])


class PrepackedOnnxModel:
    """The optimized model ORT wrote, with its initializers and packed layouts in a mapped file."""

    def __init__(self, directory: Path) -> None:
        import onnx

        self.proto = onnx.load(str(directory / _MODEL), load_external_data=False)
        data = directory / _DATA
        with open(data, "rb") as f:  # mapped: the pages outlive the (temporary) file's removal
            self._data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if data.stat().st_size else b""

    def _entries(self, tensor: Any) -> dict[str, str]:
        return {entry.key: entry.value for entry in tensor.external_data}

    def initializer_bytes(self, tensor: Any) -> Any:
        """Initializer ``tensor``'s bytes in the data file, or ``None`` if they are in the model."""
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            return None
        info = self._entries(tensor)
        offset = int(info.get("offset", 0))
        return memoryview(self._data)[offset : offset + int(info["length"])]

    def packed_layouts(self, tensor: Any) -> list[tuple[str, list[memoryview]]]:
        """Each packed layout ORT saved for ``tensor``: its key and its blobs' bytes."""
        layouts = []
        for name, value in self._entries(tensor).items():
            if name.startswith(PREPACKED_PREFIX):
                key, spans = parse_prepacked(value)
                layouts.append((key, [memoryview(self._data)[o : o + n] for o, n in spans]))
        return layouts


def prepack_once(model: Any, save: Callable[[Any, Path], Path], options: "Any",
                 settings: Mapping[str, str]) -> PrepackedOnnxModel:
    """Have ORT optimize and pack ``model`` once (``save(model, directory)`` gives the file ORT
    reads; ``options``: the session options, prepacking on) and read back what it wrote."""
    import tempfile  # here: only a publisher that prepacks needs it (and shutil, bz2, lzma with it)

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="modelshare-onnx-") as scratch:
        directory = Path(scratch)
        options.optimized_model_filepath = str(directory / _MODEL)
        for key, value in {"session.save_external_prepacked_constant_initializers": "1",
                           "session.optimized_model_external_initializers_file_name": _DATA, **settings}.items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(str(save(model, directory)), sess_options=options, providers=["CPUExecutionProvider"])
        if not (directory / _DATA).exists():
            (directory / _DATA).touch()  # every initializer was small: nothing went out of the model
        return PrepackedOnnxModel(directory)
