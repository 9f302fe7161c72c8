"""An ONNX model file read without copying its weights and without the ``onnx`` package: the
structure walked at the protobuf wire level, the weights left in the file's pages.

The problem: ``onnx.load`` parses the whole protobuf, so the process that publishes a model
holds every initializer once in its own memory while it writes them into the segment -- twice
the model for a moment, which is what runs a memory-limited machine out of memory on the
first load. And importing ``onnx`` at all costs ~10 MiB and, cold, half a second before the first
inference. Here the file is memory-mapped and walked at the wire level: each top-level graph
initializer becomes a :class:`FileInitializer` -- its name, type, shape, its other fields as
bytes, and its data as a view of the mapped file (page cache, shared, not this process's memory)
or of an external data file beside it. The ONNX codec splits such a model by rewriting the
initializers' bytes (:meth:`MappedOnnxModel.rewrite`); the ``onnx`` package parses only the small
skeleton, and only where a model needs the proto path (:attr:`MappedOnnxModel.proto`).

Wire format used (protobuf): ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto: dims =
1, data_type = 2, the typed data fields (float 4, int32 5, string 6, int64 7, double 10, uint64 11),
name = 8, raw_data = 9, external_data = 13 (StringStringEntryProto: key = 1, value = 2),
data_location = 14. Anything else -- subgraphs, constants, the other tensor fields -- is kept as
it was.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["FileInitializer", "MappedOnnxModel"]

_VARINT, _LEN = 0, 2
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _NAME, _RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION = 1, 2, 8, 9, 13, 14
_TYPED_DATA = frozenset({4, 5, 6, 7, 10, 11})
_EXTERNAL = 1  # TensorProto.EXTERNAL


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
        if wire == _VARINT:
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


def _varint_field(field: int, value: int) -> bytes:
    return _encode_varint(field << 3 | _VARINT) + _encode_varint(value)


def _packed_varints(buf: memoryview, start: int, end: int) -> list[int]:
    values, pos = [], start
    while pos < end:
        value, pos = _varint(buf, pos)
        values.append(value)
    return values


def _entries(buf: memoryview, start: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto's (key, value)."""
    found = {1: "", 2: ""}
    for field, wire, _, value_start, value_end in _fields(buf, start, end):
        if field in found and wire == _LEN:
            found[field] = bytes(buf[value_start:value_end]).decode()
    return found[1], found[2]


@dataclass(frozen=True)
class FileInitializer:
    """A graph initializer as the file holds it: ``data`` is a view of the mapped model file (its
    raw_data) or of its external data file, ``None`` where it has none (or typed data fields)."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    kept: bytes  # every field but raw_data, external_data and data_location
    external: bytes  # its external_data and data_location fields, as written
    data: Optional[memoryview]
    typed: bool  # holds typed data fields (float_data, int64_data...), kept in ``kept``

    def embedded(self) -> bytes:
        """The tensor with its data inside it (raw_data), wherever the file kept them."""
        return self.kept + (_length_delimited(_RAW_DATA, bytes(self.data)) if self.data is not None else self.external)

    def elsewhere(self, location: str, offset: str, length: int) -> bytes:
        """The tensor with its data in external data at ``location``, ``offset``."""
        entries = b"".join(_length_delimited(_EXTERNAL_DATA, _length_delimited(1, key.encode())
                                             + _length_delimited(2, value.encode()))
                           for key, value in (("location", location), ("offset", offset), ("length", str(length))))
        return self.kept + entries + _varint_field(_DATA_LOCATION, _EXTERNAL)


def _map_file(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty")
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


class MappedOnnxModel:
    """An ONNX model file whose initializers stay in the (memory-mapped) file until encoded."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._maps: dict[Path, mmap.mmap] = {self.path: _map_file(self.path)}
        self.initializers: list[FileInitializer] = []

        def read(start: int, end: int) -> bytes:
            tensor = self._read_initializer(memoryview(self._maps[self.path]), start, end)
            self.initializers.append(tensor)
            return tensor.kept + tensor.external

        self.skeleton = self._replace_initializers(read)  # the model without its raw_data
        names = [i.name for i in self.initializers]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path} names an initializer twice")
        self._by_name = {i.name: i for i in self.initializers}

    def _read_initializer(self, buf: memoryview, start: int, end: int) -> FileInitializer:
        kept, external = bytearray(), bytearray()
        name, data_type, dims, typed = "", 0, [], False
        raw: Optional[memoryview] = None
        info: dict[str, str] = {}
        location = 0
        for field, wire, field_start, value_start, value_end in _fields(buf, start, end):
            if field == _RAW_DATA and wire == _LEN:
                raw = buf[value_start:value_end]
                continue
            if field in (_EXTERNAL_DATA, _DATA_LOCATION):
                external += buf[field_start:value_end]
                if field == _EXTERNAL_DATA and wire == _LEN:
                    key, value = _entries(buf, value_start, value_end)
                    info[key] = value
                elif wire == _VARINT:
                    location = _varint(buf, value_start)[0]
                continue
            kept += buf[field_start:value_end]
            if field == _NAME and wire == _LEN:
                name = bytes(buf[value_start:value_end]).decode()
            elif field == _DATA_TYPE and wire == _VARINT:
                data_type = _varint(buf, value_start)[0]
            elif field == _DIMS:
                dims += _packed_varints(buf, value_start, value_end) if wire == _LEN else [_varint(buf, value_start)[0]]
            elif field in _TYPED_DATA:
                typed = True
        data = self._external_bytes(info) if location == _EXTERNAL else raw
        return FileInitializer(name, data_type, tuple(dims), bytes(kept), bytes(external), data, typed)

    def _external_bytes(self, info: dict[str, str]) -> memoryview:
        """The bytes an external_data entry names: a view of the data file beside the model."""
        if "location" not in info:
            raise ValueError(f"{self.path}: an initializer's external data has no location")
        location = self.path.parent / info["location"]
        if location not in self._maps:
            self._maps[location] = _map_file(location)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(self._maps[location]) - offset
        if offset + length > len(self._maps[location]):
            raise ValueError(f"{location} is shorter than the external data {self.path} places in it")
        return memoryview(self._maps[location])[offset : offset + length]

    def rewrite(self, tensor: Callable[[FileInitializer], bytes]) -> bytes:
        """The serialized model with each top-level initializer's bytes replaced by ``tensor(it)``."""
        initializers = iter(self.initializers)
        return self._replace_initializers(lambda start, end: tensor(next(initializers)))

    def _replace_initializers(self, tensor: Callable[[int, int], bytes]) -> bytes:
        """The model file with each top-level initializer -- the bytes [start, end) -- replaced by
        ``tensor(start, end)``, everything else as it is."""
        buf = memoryview(self._maps[self.path])
        model = bytearray()
        for field, wire, field_start, value_start, value_end in _fields(buf, 0, len(buf)):
            if field != _MODEL_GRAPH or wire != _LEN:
                model += buf[field_start:value_end]
                continue
            graph = bytearray()
            for g_field, g_wire, g_start, g_value_start, g_end in _fields(buf, value_start, value_end):
                is_initializer = g_field == _GRAPH_INITIALIZER and g_wire == _LEN
                graph += _length_delimited(_GRAPH_INITIALIZER, tensor(g_value_start, g_end)) if is_initializer \
                    else buf[g_start:g_end]
            model += _length_delimited(_MODEL_GRAPH, bytes(graph))
        return bytes(model)

    @property
    def weights_nbytes(self) -> int:
        """The bytes of every initializer's data (in the file or in external data)."""
        return sum(len(i.data) for i in self.initializers if i.data is not None)

    @property
    def nbytes(self) -> int:
        """The model's size: its structure and every initializer's data."""
        return len(self.skeleton) + self.weights_nbytes

    @cached_property
    def proto(self) -> Any:
        """The skeleton as an ``onnx.ModelProto`` (initializers' data read through
        :meth:`initializer_bytes`), for the codec's proto path."""
        import onnx

        return onnx.load_from_string(self.skeleton)

    def initializer_bytes(self, tensor: Any) -> Optional[memoryview]:
        """Initializer ``tensor``'s bytes (``tensor`` from :attr:`proto`): a view of the model file or
        of its external data file, or ``None`` if they are in the skeleton itself (typed fields)."""
        found = self._by_name.get(tensor.name)
        return found.data if found is not None else None
