"""An ONNX model file read without copying its weights: the structure parsed, the weights left in
the file's pages.

The problem: ``onnx.load`` parses the whole protobuf, so the process that publishes a model
holds every initializer once in its own memory while it writes them into the segment -- twice
the model for a moment, which is what runs a memory-limited machine out of memory on the
first load. Here the file is memory-mapped and walked at the protobuf wire level: the top-level
graph's initializers are copied *without* their ``raw_data`` (a few bytes each) and everything else
verbatim, so only that small skeleton is parsed by ``onnx``; each initializer's bytes are a view of
the mapped file (page cache, shared, not this process's memory), and so are initializers kept in
external data files beside it. The ONNX codec encodes a :class:`MappedOnnxModel` like a
``ModelProto``, reading weights through :meth:`MappedOnnxModel.initializer_bytes`.

Wire format used (protobuf): ModelProto.graph = field 7, GraphProto.initializer = field 5,
TensorProto.name = field 8, TensorProto.raw_data = field 9. Anything else -- typed data fields,
subgraphs, constants -- stays in the skeleton as it was.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["MappedOnnxModel"]

_LEN = 2
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in [start, end)."""
    pos = start
    while pos < end:
        key, value_start = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _varint(buf, value_start)
        elif wire == 1:
            value_end = value_start + 8
        elif wire == _LEN:
            length, value_start = _varint(buf, value_start)
            value_end = value_start + length
        elif wire == 5:
            value_end = value_start + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if value_end > end:
            raise ValueError(f"a field at byte {pos} runs past its message")
        yield field, wire, pos, value_start, value_end
        pos = value_end


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _strip_initializer(buf: memoryview, start: int, end: int) -> tuple[bytes, str, tuple[int, int]]:
    """A TensorProto without its raw_data: (bytes, name, raw_data's range), or the range (0, 0)."""
    kept, name, raw = bytearray(), "", (0, 0)
    for field, wire, field_start, value_start, value_end in _fields(buf, start, end):
        if field == _TENSOR_RAW_DATA and wire == _LEN:
            raw = (value_start, value_end)
            continue
        if field == _TENSOR_NAME and wire == _LEN:
            name = bytes(buf[value_start:value_end]).decode()
        kept += buf[field_start:value_end]
    return bytes(kept), name, raw


def strip_raw_data(buf: memoryview) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The serialized ModelProto in ``buf`` without its graph initializers' raw_data, and where
    each stripped initializer's bytes lie in ``buf`` (by name)."""
    model, ranges = bytearray(), {}
    for field, wire, field_start, value_start, value_end in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH or wire != _LEN:
            model += buf[field_start:value_end]
            continue
        graph = bytearray()
        for g_field, g_wire, g_start, g_value_start, g_value_end in _fields(buf, value_start, value_end):
            if g_field == _GRAPH_INITIALIZER and g_wire == _LEN:
                tensor, name, raw = _strip_initializer(buf, g_value_start, g_value_end)
                if raw[1] > raw[0] and name and name not in ranges:
                    ranges[name] = raw
                    graph += _length_delimited(_GRAPH_INITIALIZER, tensor)
                    continue
            graph += buf[g_start:g_value_end]
        model += _length_delimited(_MODEL_GRAPH, bytes(graph))
    return bytes(model), ranges


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty")
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


class MappedOnnxModel:
    """An ONNX model file whose initializers stay in the (memory-mapped) file until encoded."""

    def __init__(self, path: Path) -> None:
        import onnx

        self.path = Path(path)
        self._maps: dict[Path, mmap.mmap] = {self.path: _map_file(self.path)}
        skeleton, self._ranges = strip_raw_data(memoryview(self._maps[self.path]))
        self.proto = onnx.load_from_string(skeleton)

    def initializer_bytes(self, tensor: Any) -> Any:
        """Initializer ``tensor``'s bytes: a view of the model file or of its external data file,
        or ``None`` if they are in the skeleton itself (typed fields)."""
        if tensor.name in self._ranges:
            start, end = self._ranges[tensor.name]
            return memoryview(self._maps[self.path])[start:end]
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            return None
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = self.path.parent / info["location"]
        if location not in self._maps:
            self._maps[location] = _map_file(location)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(self._maps[location]) - offset
        return memoryview(self._maps[location])[offset : offset + length]
