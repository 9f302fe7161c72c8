"""The ONNX Runtime codec: initializers in the segment, an ``InferenceSession`` in every process.

An ONNX model is a protobuf whose weights are its graph's *initializers*. Encoding (in the one
process that loads) moves every large initializer's bytes into a segment buffer and marks it in
the model as external data; the stripped model, a few KiB of structure, is the skeleton.

Decoding, in every process, gives ORT the weights twice over without copying them:

* each buffer becomes an ``OrtValue`` over the segment (``OrtValue.ortvalue_from_numpy`` on a
  view, no copy) handed to ``SessionOptions.add_initializer``, with which ORT "uses this
  initializer instance instead of deserializing one from the model file": the kernels compute
  on the segment;
* the model's external-data entries point at the file that holds each buffer, at its offset,
  so that graph optimizers that read an initializer's bytes (constant folding a Cast of an fp16
  weight, say) read the real bytes. ORT reads data files from one directory only (no absolute
  paths, no symlinks out): the model is given from memory with that directory as its external
  data folder.

File-backed: a model read from an ONNX file whose weights cannot be rewritten (or with
``map_files=True``) keeps them in that file -- the ``.onnx`` itself or its external data beside it
-- and every process maps the file instead of a copy in ``/dev/shm``, as ORT does for one
session: nothing is copied at publish, the pages are reclaimable page cache. Only when every
buffer is in one directory (``maps_files``); otherwise they are all copied.

Measured dead ends, kept out: ``add_external_initializers`` and in-memory external data both copy
every initializer into the session (+128 MiB of private memory per process for a 128 MiB
model); overriding initializers whose external data is a dummy file is zero-copy but lets
constant folding read the dummy (wrong outputs, caught by the property tests).

Attaching processes never import the ``onnx`` package (~10 MiB per process): the skeleton's
file name and offsets are fixed-width placeholders, patched as bytes. Nor does a process that
publishes a model file: it is split at the protobuf wire level (``_onnx_file``), unless an
initializer holds typed data fields that only ``onnx`` converts, or ``prepack="shared"``.

Prepacking: ORT's CPU kernels may repack a constant weight into a kernel-friendly layout at
session creation. ``prepack=False`` (the default) turns it off (``session.disable_prepacking``):
one copy of the weights, but kernels pack on every call. ``prepack=True``: each process packs
into private memory -- a second copy per process. ``prepack="shared"``: the publisher has ORT
optimize and pack the model once and the packed layouts go into the segment beside the weights
(``_onnx_prepacked``): packed kernels in every process over one shared copy of the layouts, for
the segment holding both. Measured in ``docs/codecs.md``.

What stays in the skeleton: initializers under ``min_shared_bytes``, strings, packed 4-bit
types, and initializers of subgraphs (If/Loop/Scan bodies), which ORT cannot take from outside.

Session options: a dict (or an ``onnxruntime.SessionOptions``, whose settable attributes are
copied into one, since it cannot be pickled to other processes) -- attribute names as keys, plus
``"config": {key: value}`` for ``add_session_config_entry`` entries.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import onnxruntime as ort

from .._host.heap import reclaim_heap
from ..errors import EncodeError
from . import Codec, Encoded
from ._onnx_file import FileInitializer, MappedOnnxModel
from ._onnx_prepacked import PrepackedOnnxModel, format_prepacked, prepack_once

__all__ = ["OnnxCodec", "Prepack", "session_options_dict"]

_OPTION_ATTRIBUTES = ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "execution_mode",
                      "execution_order", "enable_cpu_mem_arena", "enable_mem_pattern", "enable_mem_reuse",
                      "log_severity_level", "log_verbosity_level", "use_deterministic_compute", "logid")
SessionOptionsLike = Union[Mapping[str, Any], "ort.SessionOptions", None]
Prepack = Union[bool, Literal["shared"]]

# TensorProto.DataType values this codec shares, with their numpy dtype (None: ORT reads raw bits).
_ELEMENT_TYPES: dict[int, Optional[str]] = {
    1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8",
    12: "<u4", 13: "<u8", 14: "<c8", 15: "<c16", 16: None, 17: None, 18: None, 19: None, 20: None,
}
_RAW_ITEMSIZE = {16: 2, 17: 1, 18: 1, 19: 1, 20: 1}
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")

# Fixed-width placeholders in the skeleton, patched per process without parsing the protobuf.
_LOCATION_WIDTH, _OFFSET_WIDTH = 240, 32
_PLACEHOLDER = re.compile(rb"@modelshare-(location|offset)-(\d{9})~*")


def _placeholder(kind: str, index: int, width: int) -> str:
    return f"@modelshare-{kind}-{index:09d}".ljust(width, "~")


def _padded_name(name: str, width: int) -> bytes:
    """``name`` as a relative path of exactly ``width`` bytes: ``./././name`` (or ``.//./name``)."""
    pad = width - len(name)
    if pad < 0:
        raise ValueError(f"segment file name {name!r} is longer than {width} characters")
    prefix = "./" * (pad // 2) if pad % 2 == 0 else ".//" + "./" * ((pad - 3) // 2)
    return (prefix + name).encode()


def _patch(skeleton: bytes, location: Any, offset: Any) -> bytes:
    """Replace the placeholders: ``location(i)`` and ``offset(i)`` give buffer i's file and offset."""

    def fill(match: "re.Match[bytes]") -> bytes:  # same length, so the protobuf stays valid
        index, width = int(match.group(2)), len(match.group(0))
        if match.group(1) == b"location":
            return _padded_name(location(index), width)
        return f"{offset(index):0{width}d}".encode()

    return _PLACEHOLDER.sub(fill, skeleton)


def session_options_dict(options: SessionOptionsLike) -> dict[str, Any]:
    """A picklable description of session options (see the module docstring)."""
    if options is None:
        return {}
    if isinstance(options, ort.SessionOptions):
        return {name: getattr(options, name) for name in _OPTION_ATTRIBUTES}
    unknown = set(options) - set(_OPTION_ATTRIBUTES) - {"config"}
    if unknown:
        raise ValueError(f"unknown session options {sorted(unknown)}; use {list(_OPTION_ATTRIBUTES)} or 'config'")
    return dict(options)


def _build_session_options(options: Mapping[str, Any], prepack: bool) -> "ort.SessionOptions":
    built = ort.SessionOptions()
    for name, value in options.items():
        if name != "config":
            setattr(built, name, value)
    for key, value in options.get("config", {}).items():
        built.add_session_config_entry(key, str(value))
    if not prepack:
        built.add_session_config_entry("session.disable_prepacking", "1")
    return built


def _provider_name(provider: Any) -> str:
    """A provider's name, whether given as a name or as (name, options)."""
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def _view(buffer: memoryview, data_type: int, dims: Sequence[int]) -> "ort.OrtValue":
    """An OrtValue over ``buffer`` with ONNX element type ``data_type``: no copy."""
    dtype = _ELEMENT_TYPES[data_type]
    if dtype is None:  # bfloat16, float8: no numpy dtype, ORT takes the raw bits
        raw = np.frombuffer(buffer, dtype=f"u{_RAW_ITEMSIZE[data_type]}").reshape(dims)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, data_type)
    return ort.OrtValue.ortvalue_from_numpy(np.frombuffer(buffer, dtype=dtype).reshape(dims))


def _initializer_bytes(tensor: Any) -> memoryview:
    """An initializer's bytes in ONNX's little-endian layout (raw_data, or converted typed fields)."""
    if tensor.HasField("raw_data"):
        return memoryview(tensor.raw_data)
    from onnx import numpy_helper

    return memoryview(numpy_helper.to_array(tensor).tobytes())


def _embed(model: Any, tensor: Any) -> None:
    """Put back into the skeleton the bytes of an initializer that stays there, where ``model`` is a
    file whose reader left them in the file (``MappedOnnxModel``)."""
    mapped = getattr(model, "initializer_bytes", None)
    data = mapped(tensor) if mapped is not None else None
    if data is not None:
        from onnx import TensorProto

        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        tensor.raw_data = bytes(data)


def _strip(tensor: Any, index: int, nbytes: int) -> None:
    """Replace an initializer's data with placeholders for segment buffer ``index``."""
    from onnx import TensorProto

    for field in _DATA_FIELDS:
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", _placeholder("location", index, _LOCATION_WIDTH)),
                       ("offset", _placeholder("offset", index, _OFFSET_WIDTH)), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def load_onnx_file(path: Path) -> Any:
    """The model in an ONNX file, its weights left in the file's pages until they are encoded
    (``_onnx_file``); external data beside it included. A file the wire-level reader cannot take
    is loaded whole with ``onnx.load``."""
    try:
        return MappedOnnxModel(path)
    except (ValueError, IndexError, OSError):
        import onnx

        return onnx.load(str(path), load_external_data=True)


def load_onnx_bytes(data: bytes) -> Any:
    """An ``onnx.ModelProto`` from serialized bytes."""
    import onnx

    return onnx.load_from_string(data)


def _model_proto(model: Any) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (a ModelProto, or a file read by ``load_onnx_file``)."""
    import onnx

    proto = model.proto if isinstance(model, (MappedOnnxModel, PrepackedOnnxModel)) else model
    if not isinstance(proto, onnx.ModelProto):
        raise EncodeError(f"the ONNX codec takes an onnx.ModelProto, not {type(model).__qualname__}")
    return proto


def _data_of(model: Any, tensor: Any) -> memoryview:
    """An initializer's bytes: from the mapped file where ``model`` is one, else from the proto."""
    mapped = getattr(model, "initializer_bytes", None)
    found = mapped(tensor) if mapped is not None else None
    return found if found is not None else _initializer_bytes(tensor)


def _saved_for_ort(model: Any, directory: Path) -> Path:
    """A file ORT can read ``model`` from: the model's own file, or one written into ``directory``."""
    path = getattr(model, "path", None)
    if path is not None:
        return Path(path)
    import onnx

    saved = directory / "source.onnx"
    onnx.save_model(model, str(saved), save_as_external_data=True, location="source.data", size_threshold=1024)
    return saved


class OnnxCodec(Codec):
    """``onnx.ModelProto`` in, ``onnxruntime.InferenceSession`` over shared initializers out."""

    name = "onnx"

    def __init__(self, providers: Optional[Sequence[Any]] = None, session_options: SessionOptionsLike = None,
                 prepack: Prepack = False, min_shared_bytes: int = 1024) -> None:
        if prepack not in (False, True, "shared"):
            raise ValueError(f"prepack must be False, True or 'shared', not {prepack!r}")
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        if prepack == "shared" and any(_provider_name(p) != "CPUExecutionProvider" for p in self.providers):
            raise ValueError(f"prepack='shared' shares the layouts ORT's CPU kernels pack, and providers="
                             f"{self.providers!r} runs elsewhere: use prepack=False (or True) there")
        self.session_options = session_options_dict(session_options)
        self.prepack = prepack
        self.min_shared_bytes = min_shared_bytes

    @property
    def layout(self) -> str:
        return "prepacked" if self.prepack == "shared" else ""

    def encode(self, model: Any) -> Encoded:
        """Split ``model``; its large initializers are moved out (the ModelProto is consumed).
        With ``prepack="shared"`` the model ORT optimized and packed is split instead, its packed
        layouts becoming buffers too."""
        if self.prepack == "shared":
            model = prepack_once(model, _saved_for_ort, _build_session_options(self.session_options, True),
                                 {"session.optimized_model_external_initializers_min_size_in_bytes":
                                  str(self.min_shared_bytes)})
        elif isinstance(model, MappedOnnxModel) and not any(i.typed and i.data_type in _ELEMENT_TYPES
                                                             for i in model.initializers):
            return self._encode_file(model)
        proto = _model_proto(model)
        packed_layouts = model.packed_layouts if isinstance(model, PrepackedOnnxModel) else lambda tensor: []
        encoded = Encoded(b"", [], [], views="copy-on-write")
        specs: list[Optional[tuple[str, int, list[int]]]] = []  # per buffer: an initializer, or None (a layout)
        for tensor in proto.graph.initializer:
            if tensor.data_type not in _ELEMENT_TYPES:  # strings and packed 4-bit types stay in the skeleton
                _embed(model, tensor)
                continue
            data = _data_of(model, tensor)
            if data.nbytes < self.min_shared_bytes:
                _embed(model, tensor)
                continue
            layouts = packed_layouts(tensor)
            specs.append((tensor.name, tensor.data_type, list(tensor.dims)))
            encoded.buffers.append(data)
            encoded.buffer_info.append({"initializer": tensor.name, "dims": list(tensor.dims),
                                        "data_type": tensor.data_type})
            _strip(tensor, len(encoded.buffers) - 1, data.nbytes)
            for number, (key, blobs) in enumerate(layouts):
                placed = []
                for blob in blobs:
                    specs.append(None)
                    encoded.buffers.append(blob)
                    encoded.buffer_info.append({"initializer": tensor.name, "packed": key})
                    placed.append((_placeholder("offset", len(encoded.buffers) - 1, _OFFSET_WIDTH), blob.nbytes))
                entry = tensor.external_data.add()
                entry.key, entry.value = f"prepacked_{number}", format_prepacked(key, placed)
        packed = isinstance(model, PrepackedOnnxModel)
        encoded.skeleton = pickle.dumps((proto.SerializeToString(), specs, packed), protocol=5)
        return encoded

    def _encode_file(self, model: MappedOnnxModel) -> Encoded:
        """A model file split at the wire level: the same split as a ModelProto's, without the ``onnx``
        package (half a second to import, cold, before a first inference) or a parse of the model."""
        encoded = Encoded(b"", [], [], views="copy-on-write")
        specs: list[Optional[tuple[str, int, list[int]]]] = []

        def place(tensor: FileInitializer) -> bytes:
            data = tensor.data
            if data is None or tensor.data_type not in _ELEMENT_TYPES or data.nbytes < self.min_shared_bytes:
                return tensor.embedded()
            index = len(encoded.buffers)
            specs.append((tensor.name, tensor.data_type, list(tensor.dims)))
            encoded.buffers.append(data)
            encoded.buffer_info.append({"initializer": tensor.name, "dims": list(tensor.dims),
                                        "data_type": tensor.data_type})
            return tensor.elsewhere(_placeholder("location", index, _LOCATION_WIDTH),
                                    _placeholder("offset", index, _OFFSET_WIDTH), data.nbytes)

        encoded.skeleton = pickle.dumps((model.rewrite(place), specs, False), protocol=5)
        return encoded

    def maps_files(self, files: Sequence[Optional[Path]]) -> bool:
        """ORT reads external data from one directory only (``session.model_external_initializers_
        file_folder_path``): buffers stay in weights files only when every one does, all in one
        directory. Packed layouts are written into the segment, so ``prepack="shared"`` copies."""
        return (self.prepack != "shared" and bool(files) and all(files)
                and len({f.parent for f in files}) == 1 and all(len(f.name) <= _LOCATION_WIDTH for f in files))

    def decode(self, skeleton: memoryview, buffers: Sequence[memoryview]) -> "ort.InferenceSession":
        model_bytes, specs, packed = pickle.loads(skeleton)
        locations = getattr(buffers, "locations", [])
        if packed:  # packed layouts: ORT maps them, and the weights, from the segment file
            return self._packed_session(model_bytes, buffers, locations)
        options = _build_session_options(self.session_options, self.prepack is True)
        values = []
        for buffer, spec in zip(buffers, specs):
            if spec is not None:
                values.append(_view(buffer, spec[1], spec[2]))
                options.add_initializer(spec[0], values[-1])  # what the kernels compute on: the segment itself
        if locations:
            session = self._session_over_files(model_bytes, locations, options)
        else:
            session = self._session_from_memory(model_bytes, buffers, options)
        session._modelshare_initializers = values  # the OrtValues must outlive the session
        return session

    def _packed_session(self, model_bytes: bytes, buffers: Sequence[memoryview],
                        locations: Sequence[tuple[Path, int]]) -> "ort.InferenceSession":
        """A session over a skeleton with packed layouts. ORT packs each weight again, from the
        segment file, uses a saved layout only where the keys match, and frees its own packing:
        the freed heap goes back to the system here. Buffers not in one file cannot be named by a
        layout entry (it has no file of its own): packing stays off there."""
        if not locations:
            return self._session_from_memory(model_bytes, buffers,
                                             _build_session_options(self.session_options, False))
        session = self._session_over_files(model_bytes, locations, _build_session_options(self.session_options, True))
        reclaim_heap()
        return session

    def _session_over_files(self, model_bytes: bytes, locations: Sequence[tuple[Path, int]],
                            options: "ort.SessionOptions") -> "ort.InferenceSession":
        """A session whose external data entries name each buffer's file (the segment, or the weights
        file it stayed in) and offset: ORT reads them from that directory, the model from memory."""
        folders = {path.parent for path, _ in locations}
        if len(folders) != 1:
            raise ValueError(f"the ONNX codec reads a model's buffers from one directory, not {sorted(folders)}")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folders.pop()))
        patched = _patch(model_bytes, lambda i: locations[i][0].name, lambda i: locations[i][1])
        return ort.InferenceSession(patched, sess_options=options, providers=self.providers)

    def _session_from_memory(self, model_bytes: bytes, buffers: Sequence[memoryview],
                             options: "ort.SessionOptions") -> "ort.InferenceSession":
        """Buffers that are not in a file: ORT gets them as in-memory files (and copies them)."""
        names = [f"modelshare-buffer-{i}" for i in range(len(buffers))]
        if buffers:  # registered under the padded names the patched model refers to
            options.add_external_initializers_from_files_in_memory(
                [_padded_name(n, _LOCATION_WIDTH).decode() for n in names], list(buffers), [b.nbytes for b in buffers])
        return ort.InferenceSession(_patch(model_bytes, names.__getitem__, lambda i: 0), sess_options=options,
                                    providers=self.providers)

    def private_session(self, model: Any) -> "ort.InferenceSession":
        """A session that owns its weights (``share="threads"``, or a private baseline)."""
        options = _build_session_options(self.session_options, self.prepack is not False)
        path = getattr(model, "path", None)
        source = str(path) if path is not None else model.SerializeToString()  # ORT reads a file itself
        return ort.InferenceSession(source, sess_options=options, providers=self.providers)

    def estimate(self, model: Any) -> int:
        """The model's bytes; with ``prepack="shared"`` twice its weights (packed layouts take about
        what they pack: an estimate, the exact size is known once ORT has packed)."""
        if isinstance(model, MappedOnnxModel):
            return model.nbytes + (model.weights_nbytes if self.prepack == "shared" else 0)
        proto = _model_proto(model)
        in_file = sum(len(view) for view in map(getattr(model, "initializer_bytes", lambda t: None),
                                                proto.graph.initializer) if view is not None)
        weights = in_file + sum(len(tensor.raw_data) for tensor in proto.graph.initializer)
        return proto.ByteSize() + in_file + (weights if self.prepack == "shared" else 0)
