"""ONNX models (``.onnx``): every BatchNormalization node of the main graph, with its statistics, affine parameters,
epsilon, momentum and mode, read from the protobuf wire format.

A model is a ``ModelProto`` message; its ``graph`` holds the nodes and the initializers (named tensors, their bytes
in ``raw_data`` or in an external data file beside the model). bncheck walks the messages itself, field by field,
and skips every payload it does not need by its length, so a 1 GB model costs its structure and its BatchNorm
tensors, never its convolution weights, and no tensor is read before it is asked for. It does not go through the
``onnx`` package: ``import onnx`` alone takes 0.6 s (its ml_dtypes dependency 0.55 s of it), more than a whole
inspection, and ``onnx.load`` parses the whole model into memory, where a message of two bytes becomes about 160
(a 10 MB file of empty nodes takes 0.8 GB). The fields read here follow ``onnx/onnx.proto`` (proto2) as protobuf
reads them: the last occurrence of a singular field wins, a singular message met twice is merged, repeated fields
accumulate, packed or not. Anything protobuf would read differently (a known field with another wire type, a group)
is refused.

Each BatchNormalization node is one layer, named from its statistics' initializers as torch's exporters keep them
(``bn1.running_mean`` -> ``bn1``), else from the node's name. Its inputs come from initializers, ``Constant`` nodes
or through ``Identity`` nodes (the TorchScript exporter deduplicates equal initializers that way). The node records
its configuration (:class:`~bncheck.loaders.interface.RecordedCall`): epsilon, momentum converted to PyTorch's
convention, and whether it normalises with batch statistics, by the rule of the model's opset and ONNX Runtime's.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from bncheck.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnreadableFileError,
    UnsupportedDtypeError,
)
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import (
    ONNX_NODE,
    ByteLocation,
    Checkpoint,
    RecordedCall,
    TensorRef,
    contiguous_strides,
    in_memory,
)

# Limits far beyond any exported model, so that a crafted file costs seconds and megabytes: entries of the main
# graph (nodes and initializers; each costs Python time and a little memory), BatchNormalization nodes, the length
# of a name, the dimensions of a tensor, the external-data entries of one tensor, and values stored as typed fields
# (float_data, int32_data...) rather than raw bytes.
MAX_GRAPH_ENTRIES = 300_000
MAX_INITIALIZERS = 100_000
# Fields decoded in all (each costs about a microsecond): a model's structure, not its tensor bytes, which are skipped.
MAX_FIELDS = 2_000_000
MAX_BATCHNORM_NODES = 20_000
MAX_NAME_BYTES = 64 * 1024
MAX_DIMS = 64
MAX_EXTERNAL_ENTRIES = 64
MAX_TYPED_VALUES = 1 << 20
# External data files held open between reads (a model may name one file per tensor).
MAX_OPEN_FILES = 16
# Identity chains followed from a BatchNormalization input to the tensor it stands for.
MAX_IDENTITY_CHAIN = 64

# How much of the file one read fetches. A node or a tensor's metadata is read in one piece; the tensor bytes between
# them are skipped by offset, so a larger block would read weights for nothing.
_BLOCK = 64 * 1024
# a field's key and a length: two varints
_HEAD = 20
# distinct external_data entries remembered (a model's locations; its offsets and lengths differ per tensor)
_ENTRY_CACHE = 64

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# TensorProto.DataType -> torch's name for the dtype (what reports show for every format)
ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    16: "bfloat16",
    17: "float8_e4m3fn",
    18: "float8_e4m3fnuz",
    19: "float8_e5m2",
    20: "float8_e5m2fnuz",
    24: "float8_e8m0fnu",
}
# A proto2 enum field with a value outside its enum is an unknown field to protobuf: the field stays as it was.
_KNOWN_DATA_TYPES = range(0, 29)
_DATA_LOCATIONS = (0, 1)  # DEFAULT, EXTERNAL
_KNOWN_ATTRIBUTE_TYPES = range(0, 15)
_ATTR_FLOAT, _ATTR_INT, _ATTR_TENSOR, _ATTR_GRAPH, _ATTR_FLOATS, _ATTR_GRAPHS = 1, 2, 4, 5, 6, 10

# Typed fields of a TensorProto, by the dtypes stored in each (float16 and bfloat16 as their bits in int32_data).
_FLOAT_DATA, _INT32_DATA, _INT64_DATA, _DOUBLE_DATA, _UINT64_DATA = 4, 5, 7, 10, 11
_TYPED_FIELD = {
    "float32": _FLOAT_DATA,
    "float64": _DOUBLE_DATA,
    "int64": _INT64_DATA,
    "uint32": _UINT64_DATA,
    "uint64": _UINT64_DATA,
    **dict.fromkeys(("int32", "int16", "int8", "uint16", "uint8", "bool", "float16", "bfloat16"), _INT32_DATA),
}

BATCH_NORM = b"BatchNormalization"
# The nodes a BatchNormalization input is traced through (Constant, Identity): a node without any of these names
# in its bytes is skipped unparsed, since a node's op_type bytes appear verbatim in it.
_DEFAULT_DOMAINS = (b"", b"ai.onnx")

# What ONNX Runtime reads as an address in its own memory rather than a file name.
_ORT_MEMORY_LOCATION = "*/_ORT_MEM_ADDR_/*"
STAT_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def _corrupt(message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"ONNX model: {message}")


class _Window:
    """Reads of a ByteSource through one cached block: walking a message's fields costs a read per block, not per
    field, and decodes them from the block in place."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._data = b""
        self._start = 0
        self.fields = 0  # decoded through this window: held to MAX_FIELDS
        self.entries: dict[bytes, tuple[bytes, bytes]] = {}  # external_data entries decoded, by their bytes

    def view(self, offset: int, length: int) -> tuple[bytes, int]:
        """A block holding the ``length`` bytes at ``offset``, and where they start in it; callers keep them inside
        the message they walk (so inside the file)."""
        at = offset - self._start
        if at < 0 or at + length > len(self._data):
            self._data = self._source.read(offset, min(max(length, _BLOCK), self._source.size - offset))
            self._start, at = offset, 0
        return self._data, at

    def get(self, offset: int, length: int) -> bytes:
        data, at = self.view(offset, length)
        return data[at : at + length]


def _varint(data: bytes, at: int, stop: int) -> tuple[int, int]:
    """The unsigned varint at ``at`` in ``data`` (which ends for it at ``stop``) and the position after it."""
    value = shift = 0
    for position in range(at, min(at + 10, stop)):
        byte = data[position]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                break
            return value, position + 1
        shift += 7
    raise _corrupt("a malformed or truncated varint")


def _signed(value: int) -> int:
    """An int64 field's varint as the number it stands for (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(window: _Window, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Each field of the message in ``[start, end)``: (number, wire type, value, length). A varint's value is the
    number itself; any other field's value is where its payload starts, and ``length`` its size.

    A message of up to a block (a node, a tensor's metadata: most of a model's fields) is decoded in place from one
    block, a one-byte key and length inline, its fields counted once it is done; a larger one (a graph, the model)
    field by field through the blocks, its payloads skipped by offset."""
    if end - start <= _BLOCK:
        data, position = window.view(start, end - start)
        stop, shift, fields = position + end - start, start - position, 0
        try:
            while position < stop:
                fields += 1
                key = data[position]
                if key < 0x80 and key & 7 in (_VARINT, _LEN) and position + 1 < stop and data[position + 1] < 0x80:
                    number, wire, value, cursor = key >> 3, key & 7, data[position + 1], position + 2
                    if number == 0:
                        raise _corrupt("a field numbered 0")
                else:
                    number, wire, value, cursor = _key_and_value(data, position, stop)
                if wire == _VARINT:
                    yield number, wire, value, 0
                    position = cursor
                    continue
                if value > stop - cursor:
                    raise _corrupt(f"a field of {value} bytes runs past the end of its message")
                yield number, wire, cursor + shift, value
                position = cursor + value
        finally:
            window.fields += fields
        _check_fields(window)
        return
    position = start
    while position < end:
        window.fields += 1
        _check_fields(window)
        room = min(_HEAD, end - position)
        data, at = window.view(position, room)
        number, wire, value, cursor = _key_and_value(data, at, at + room)
        if wire == _VARINT:
            yield number, wire, value, 0
            position += cursor - at
            continue
        payload = position + cursor - at
        if value > end - payload:
            raise _corrupt(f"a field of {value} bytes runs past the end of its message")
        yield number, wire, payload, value
        position = payload + value


def _check_fields(window: _Window) -> None:
    if window.fields > MAX_FIELDS:
        raise _corrupt(f"more than {MAX_FIELDS} protobuf fields in the model's structure")


def _key_and_value(data: bytes, at: int, stop: int) -> tuple[int, int, int, int]:
    """The field at ``at``: its number, wire type, value (a varint's number, or the payload's length) and where its
    payload (or the next field) starts."""
    key = data[at]
    cursor = at + 1
    if key >= 0x80:
        key, cursor = _varint(data, at, stop)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise _corrupt("a field numbered 0")
    if wire in (_VARINT, _LEN):
        if cursor < stop and data[cursor] < 0x80:
            return number, wire, data[cursor], cursor + 1
        value, cursor = _varint(data, cursor, stop)
        return number, wire, value, cursor
    if wire in (_I64, _I32):
        return number, wire, 8 if wire == _I64 else 4, cursor
    raise _corrupt(f"wire type {wire} (groups, or not protobuf at all)")


def _expect(wire: int, expected: int, what: str) -> None:
    # protobuf would keep a known field of another wire type as an unknown field: refused, never read two ways
    if wire != expected:
        raise _corrupt(f"{what} has wire type {wire}, not {expected}")


def _string(window: _Window, offset: int, length: int, what: str) -> bytes:
    if length > MAX_NAME_BYTES:
        raise _corrupt(f"{what} of {length} bytes (names are at most {MAX_NAME_BYTES})")
    return window.get(offset, length)


def _display(name: bytes) -> str:
    """A name as reports show it: proto2 strings are bytes, and invalid UTF-8 is shown escaped."""
    return name.decode("utf-8", "backslashreplace")


def _quoted(name: bytes | str, limit: int = 100) -> str:
    """A name quoted in an error, cut so that the reason after it stays in the one line a report keeps."""
    text = _display(name) if isinstance(name, bytes) else name
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


@dataclass(eq=False, slots=True)
class _Tensor:
    """A TensorProto's metadata; a message met more than once (a merged attribute) accumulates here."""

    name: bytes = b""
    data_type: int = 0
    dims: list[int] = field(default_factory=list)
    raw: tuple[int, int] | None = None  # (offset, length) of raw_data in the model file
    location: int = 0  # data_location: DEFAULT or EXTERNAL
    external: list[tuple[bytes, bytes]] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # the message(s), re-read for typed values
    segment: bool = False

    @property
    def dtype(self) -> str:
        return ONNX_DTYPES.get(self.data_type, f"onnx type {self.data_type}")

    def add_number(self, number: int, wire: int, value: int, packed: bytes) -> None:
        """dims (1: one varint per field, or ``packed``), data_type (2) or data_location (14)."""
        if number == 1:
            if wire == _LEN:
                at = 0
                while at < len(packed) and len(self.dims) <= MAX_DIMS:
                    dim, at = _varint(packed, at, len(packed))
                    self.dims.append(_signed(dim))
            else:
                _expect(wire, _VARINT, "a tensor's dims")
                self.dims.append(_signed(value))
            if len(self.dims) > MAX_DIMS:
                raise _corrupt(f"a tensor with more than {MAX_DIMS} dimensions")
            return
        _expect(wire, _VARINT, "a tensor's data_type or data_location")
        if number == 2 and value in _KNOWN_DATA_TYPES:
            self.data_type = value
        elif number == 14 and value in _DATA_LOCATIONS:
            self.location = value

    def add_entry(self, entry: tuple[bytes, bytes]) -> None:
        self.external.append(entry)
        if len(self.external) > MAX_EXTERNAL_ENTRIES:
            raise _corrupt(f"a tensor with more than {MAX_EXTERNAL_ENTRIES} external_data entries")


def _read_tensor(window: _Window, start: int, end: int, tensor: _Tensor) -> None:
    tensor.spans.append((start, end))
    for number, wire, value, length in _fields(window, start, end):
        _tensor_field(window, tensor, number, wire, value, length)


def _tensor_field(window: _Window, tensor: _Tensor, number: int, wire: int, value: int, length: int) -> None:
    """One field of a TensorProto (a varint's ``value``, or a payload's offset and ``length``)."""
    if number in (1, 2, 14):
        tensor.add_number(number, wire, value, window.get(value, length) if wire == _LEN else b"")
    elif number in (3, 8, 9, 13):
        _expect(wire, _LEN, "a tensor's segment, name, raw_data or external_data")
        if number == 8:
            tensor.name = _string(window, value, length, "a tensor name")
        elif number == 9:
            tensor.raw = (value, length)
        elif number == 13:
            tensor.add_entry(_read_entry(window, value, length))
        else:
            tensor.segment = True


def _read_entry(window: _Window, start: int, length: int) -> tuple[bytes, bytes]:
    """A StringStringEntryProto: (key, value). The same few entries recur in every tensor of a model (its location),
    so each distinct one is decoded once."""
    data = window.get(start, length)
    known = window.entries.get(data)
    if known is not None:
        return known
    found = {1: b"", 2: b""}
    for number, wire, value, size in _fields(window, start, start + length):
        if number in found:
            _expect(wire, _LEN, "an external_data entry")
            found[number] = _string(window, value, size, "an external_data key or value")
    if len(window.entries) < _ENTRY_CACHE:
        window.entries[data] = (found[1], found[2])
    return found[1], found[2]


@dataclass
class _Attribute:
    name: bytes = b""
    type: int = 0
    f: float = 0.0
    i: int = 0
    floats: list[float] = field(default_factory=list)
    tensor: _Tensor | None = None
    graphs: list[tuple[int, int]] = field(default_factory=list)  # subgraph spans (If, Loop, Scan bodies)


def _read_attribute(window: _Window, start: int, end: int) -> _Attribute:
    attribute = _Attribute()
    for number, wire, value, length in _fields(window, start, end):
        if number == 1:
            _expect(wire, _LEN, "an attribute's name")
            attribute.name = _string(window, value, length, "an attribute name")
        elif number == 20:
            _expect(wire, _VARINT, "an attribute's type")
            if value in _KNOWN_ATTRIBUTE_TYPES:
                attribute.type = value
        elif number == 2:
            _expect(wire, _I32, "an attribute's float")
            (attribute.f,) = struct.unpack("<f", window.get(value, 4))
        elif number == 3:
            _expect(wire, _VARINT, "an attribute's int")
            attribute.i = _signed(value)
        elif number == 7:
            if wire == _LEN:
                if length % 4 or len(attribute.floats) + length // 4 > MAX_TYPED_VALUES:
                    raise _corrupt("an attribute's packed floats are malformed or too many")
                attribute.floats.extend(np.frombuffer(window.get(value, length), "<f4").tolist())
            else:
                _expect(wire, _I32, "an attribute's floats")
                attribute.floats.extend(struct.unpack("<f", window.get(value, 4)))
            if len(attribute.floats) > MAX_TYPED_VALUES:
                raise _corrupt("an attribute with too many floats")
        elif number == 5:
            _expect(wire, _LEN, "an attribute's tensor")
            attribute.tensor = attribute.tensor or _Tensor()
            _read_tensor(window, value, value + length, attribute.tensor)
        elif number in (6, 11):
            _expect(wire, _LEN, "an attribute's graph")
            attribute.graphs.append((value, value + length))
    return attribute


@dataclass(slots=True)
class _Node:
    inputs: list[bytes] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)
    name: bytes = b""
    op_type: bytes = b""
    domain: bytes = b""
    attributes: list[tuple[int, int]] = field(default_factory=list)  # spans, read once the op_type is known

    def add_name(self, number: int, wire: int, text: bytes) -> None:
        """A name field: an input (1), an output (2), the node's name (3), op_type (4) or domain (7)."""
        _expect(wire, _LEN, "a node's names")
        if number == 1:
            self.inputs.append(text)
        elif number == 2:
            self.outputs.append(text)
        elif number == 3:
            self.name = text
        elif number == 4:
            self.op_type = text
        else:
            self.domain = text

    def add_attribute(self, wire: int, start: int, end: int) -> None:
        _expect(wire, _LEN, "a node's attribute")
        self.attributes.append((start, end))


_NODE_FIELDS = frozenset((1, 2, 3, 4, 7))


def _read_node(window: _Window, start: int, end: int) -> _Node | None:
    """The node at ``[start, end)``, or None when it is none of the ops a BatchNormalization input is traced
    through (nor a control-flow node that mentions one)."""
    if end - start > _BLOCK:  # a Constant holding a large tensor, a control-flow node: through the blocks
        node = _Node()
        for number, wire, value, length in _fields(window, start, end):
            if number in _NODE_FIELDS:
                node.add_name(number, wire, _string(window, value, length, "a node's input, output or name"))
            elif number == 5:
                node.add_attribute(wire, value, value + length)
        return node
    data, at = window.view(start, end - start)
    stop = at + end - start
    traced = (data.find(op, at, stop) >= 0 for op in (BATCH_NORM, b"Constant", b"Identity"))
    if not any(traced):
        return None
    # the hot path (every node of the graph that names a traced op): decoded from the block in place
    node, position, shift, fields = _Node(), at, start - at, 0
    while position < stop:
        fields += 1
        number, wire, value, cursor = _key_and_value(data, position, stop)
        position = cursor if wire == _VARINT else cursor + value
        if position > stop:
            raise _corrupt(f"a field of {value} bytes runs past the end of its message")
        if number in _NODE_FIELDS:
            if wire == _LEN and value > MAX_NAME_BYTES:
                raise _corrupt(f"a node's name of {value} bytes (names are at most {MAX_NAME_BYTES})")
            node.add_name(number, wire, data[cursor:position])
        elif number == 5:
            node.add_attribute(wire, cursor + shift, position + shift)
    window.fields += fields
    _check_fields(window)
    return node


@dataclass
class _BatchNorm:
    node: _Node
    index: int  # among the graph's BatchNormalization nodes
    attributes: dict[bytes, _Attribute]


@dataclass
class _Graph:
    """What the main graph says about its BatchNormalization nodes and the tensors they read."""

    batch_norms: list[_BatchNorm] = field(default_factory=list)
    initializers: dict[bytes, _Tensor] = field(default_factory=dict)
    constants: dict[bytes, _Tensor | list[float]] = field(default_factory=dict)
    identities: dict[bytes, bytes] = field(default_factory=dict)
    sparse: set[bytes] = field(default_factory=set)  # names of sparse initializers (not read)
    subgraph_mentions: list[str] = field(default_factory=list)  # control-flow nodes whose bodies name BatchNorm
    entries: int = 0


def _mentions(window: _Window, start: int, end: int, needle: bytes) -> bool:
    """Whether the bytes in ``[start, end)`` contain ``needle``, read block by block."""
    step = _BLOCK
    for offset in range(start, end, step):
        chunk = window.get(offset, min(step + len(needle) - 1, end - offset))
        if needle in chunk:
            return True
    return False


def _add_node(window: _Window, node: _Node, graph: _Graph) -> None:
    if node.domain not in _DEFAULT_DOMAINS:
        return
    attributes = {a.name: a for a in (_read_attribute(window, s, e) for s, e in node.attributes)}
    if node.op_type == BATCH_NORM:
        if len(graph.batch_norms) >= MAX_BATCHNORM_NODES:
            raise _corrupt(f"more than {MAX_BATCHNORM_NODES} BatchNormalization nodes")
        graph.batch_norms.append(_BatchNorm(node, len(graph.batch_norms), attributes))
    elif node.op_type == b"Constant" and len(node.outputs) == 1:
        value = _constant_value(attributes)
        if value is not None:
            graph.constants[node.outputs[0]] = value
    elif node.op_type == b"Identity" and len(node.inputs) == 1 and len(node.outputs) == 1:
        graph.identities[node.outputs[0]] = node.inputs[0]
    else:
        bodies = [span for a in attributes.values() for span in a.graphs]
        if any(_mentions(window, s, e, BATCH_NORM) for s, e in bodies):
            graph.subgraph_mentions.append(f"{_display(node.op_type)} {_quoted(node.name)}")


def _constant_value(attributes: dict[bytes, _Attribute]) -> _Tensor | list[float] | None:
    """A Constant node's value, when it is a tensor or floats (the forms a statistic can take)."""
    value = attributes.get(b"value")
    if value is not None and value.type == _ATTR_TENSOR and value.tensor is not None:
        return value.tensor
    floats = attributes.get(b"value_floats")
    if floats is not None and floats.type == _ATTR_FLOATS:
        return floats.floats
    single = attributes.get(b"value_float")
    if single is not None and single.type == _ATTR_FLOAT:
        return [single.f]
    return None


def _read_graph(window: _Window, start: int, end: int, graph: _Graph) -> None:
    for number, wire, value, length in _fields(window, start, end):
        if number in (1, 5, 15):
            graph.entries += 1
            if graph.entries > MAX_GRAPH_ENTRIES:
                raise _corrupt(f"a graph of more than {MAX_GRAPH_ENTRIES} nodes and initializers")
        if number == 1:
            _expect(wire, _LEN, "a graph's node")
            node = _read_node(window, value, value + length)
            if node is not None:
                _add_node(window, node, graph)
        elif number == 5:
            _expect(wire, _LEN, "a graph's initializer")
            tensor = _Tensor()
            _read_tensor(window, value, value + length, tensor)
            if tensor.name in graph.initializers:
                # ONNX Runtime refuses a graph that defines a name twice
                raise _corrupt(f"two initializers named {_quoted(tensor.name)}")
            graph.initializers[tensor.name] = tensor
            if len(graph.initializers) > MAX_INITIALIZERS:
                raise _corrupt(f"a graph of more than {MAX_INITIALIZERS} initializers")
        elif number == 15:
            _expect(wire, _LEN, "a graph's sparse_initializer")
            graph.sparse.update(_sparse_names(window, value, value + length))


def _sparse_names(window: _Window, start: int, end: int) -> list[bytes]:
    """The name of a SparseTensorProto: its values tensor's."""
    for number, wire, value, length in _fields(window, start, end):
        if number == 1 and wire == _LEN:
            tensor = _Tensor()
            _read_tensor(window, value, value + length, tensor)
            return [tensor.name]
    return []


@dataclass
class _Model:
    graph: _Graph = field(default_factory=_Graph)
    opset: int | None = None
    function_mentions: int = 0  # local functions whose bodies name BatchNormalization


def _read_model(source: ByteSource) -> _Model:
    window = _Window(source)
    model = _Model()
    for number, wire, value, length in _fields(window, 0, source.size):
        if number == 7:
            _expect(wire, _LEN, "the model's graph")
            _read_graph(window, value, value + length, model.graph)  # a graph met twice merges, as protobuf does
        elif number == 8:
            _expect(wire, _LEN, "the model's opset_import")
            domain, version = _read_entry_version(window, value, value + length)
            if domain in _DEFAULT_DOMAINS and version is not None:
                model.opset = version
        elif number == 25:
            _expect(wire, _LEN, "the model's functions")
            model.function_mentions += _mentions(window, value, value + length, BATCH_NORM)
    return model


def _read_entry_version(window: _Window, start: int, end: int) -> tuple[bytes, int | None]:
    """An OperatorSetIdProto: (domain, version)."""
    domain, version = b"", None
    for number, wire, value, length in _fields(window, start, end):
        if number == 1:
            _expect(wire, _LEN, "an opset's domain")
            domain = _string(window, value, length, "an opset domain")
        elif number == 2:
            _expect(wire, _VARINT, "an opset's version")
            version = _signed(value)
    return domain, version


# ---------------------------------------------------------------- tensors: where their bytes are, read on demand


def _numel(tensor: _Tensor) -> int:
    if min(tensor.dims, default=0) < 0:
        raise _corrupt(f"tensor {_quoted(tensor.name)} has a negative dimension {tensor.dims}")
    return math.prod(tensor.dims)


def _expected_bytes(tensor: _Tensor, numel: int, length: int) -> None:
    itemsize = ITEMSIZE.get(tensor.dtype)
    if itemsize is not None and numel * itemsize != length:
        raise _corrupt(
            f"tensor {_quoted(tensor.name)}: shape {tensor.dims} of {tensor.dtype} needs "
            f"{numel * itemsize} bytes, the file gives {length}"
        )


class _ExternalFiles:
    """The external data files a model names, each opened once and only from inside the model's folder."""

    def __init__(self, model: ByteSource) -> None:
        self._model = model
        self._files: dict[str, ByteSource] = {}

    def get(self, location: bytes, tensor: bytes) -> ByteSource:
        try:
            name = location.decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(f"tensor {_quoted(tensor)} names external data {_quoted(location)}") from None
        if name not in self._files:
            self._files[name] = self._open(name, tensor)
        return self._files[name]

    @property
    def many(self) -> bool:
        """Whether the model names more files than are kept open between reads."""
        return len(self._files) > MAX_OPEN_FILES

    @property
    def size(self) -> int:
        """The bytes of every external data file the model names."""
        return sum(source.size for source in self._files.values())

    def _open(self, name: str, tensor: bytes) -> ByteSource:
        def refused(why: str) -> CorruptCheckpointError:
            return _corrupt(f"{why}: tensor {_quoted(tensor)} names external data {_quoted(name)}")

        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if not name or "\0" in name or name == _ORT_MEMORY_LOCATION:
            raise refused("external data named by no file name")
        if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
            raise refused("external data outside the model's folder, which bncheck does not read")
        try:
            if self._model.local_path is not None:
                folder = self._model.local_path.parent
                target = (folder / name).resolve()
                if not target.is_relative_to(folder.resolve()):  # a symlink that leads out of the folder
                    raise refused(f"external data linked to {_quoted(str(target))} outside the model's folder")
                if not target.is_file():
                    raise refused("external data file missing or not a file")
            return self._model.sibling(name)
        except OSError as exc:  # a name too long for the system
            raise refused(f"external data file cannot be opened ({exc.strerror or exc})") from None
        except RuntimeError as exc:  # a loop of symlinks
            raise refused(f"external data file cannot be resolved ({exc})") from None
        except (CheckpointNotFoundError, UnreadableFileError) as exc:  # a remote sibling
            raise refused(f"external data file cannot be read ({exc})") from None


def _external_source(tensor: _Tensor, files: _ExternalFiles) -> tuple[ByteSource, dict[bytes, bytes]]:
    """The external data file a tensor names (refused unless inside the model's folder), and its entries."""
    entries = dict(tensor.external)  # the last entry of a key wins, as in onnx's loader
    location = entries.get(b"location")
    if location is None:
        raise _corrupt(f"tensor {_quoted(tensor.name)} is stored externally but names no location")
    return files.get(location, tensor.name), entries


def _external_span(tensor: _Tensor, files: _ExternalFiles) -> tuple[ByteSource, int, int]:
    source, entries = _external_source(tensor, files)
    numbers = {}
    for key in (b"offset", b"length"):
        text = entries.get(key)
        if text is not None:
            if not text.isdigit() or len(text) > 20:
                raise _corrupt(f"tensor {_quoted(tensor.name)} has external {key.decode()} {_quoted(text)}")
            numbers[key] = int(text)
    offset = numbers.get(b"offset", 0)
    length = numbers.get(b"length", source.size - offset)
    if offset + length > source.size:
        raise _corrupt(
            f"tensor {_quoted(tensor.name)} needs {length} bytes at offset {offset} of "
            f"{_quoted(entries[b'location'])}, which has {source.size}"
        )
    return source, offset, length


def _typed_values(window: _Window, tensor: _Tensor, count: int) -> np.ndarray:
    """A tensor stored in a typed field (float_data, int32_data...) rather than raw bytes, in the field's order."""
    number = _TYPED_FIELD.get(tensor.dtype)
    if number is None:
        raise UnsupportedDtypeError(f"{tensor.dtype} tensors in typed fields are not read")
    name = _quoted(tensor.name)
    if count > MAX_TYPED_VALUES:
        raise _corrupt(f"tensor {name} holds {count} values outside raw_data")
    fixed = {_FLOAT_DATA: ("<f4", _I32), _DOUBLE_DATA: ("<f8", _I64)}.get(number)
    values: list[Any] = []
    for start, end in tensor.spans:
        for field_number, wire, value, length in _fields(window, start, end):
            if field_number != number:
                continue
            if fixed is not None:
                code, single = fixed
                itemsize = np.dtype(code).itemsize
                if wire != single and not (wire == _LEN and length % itemsize == 0):
                    raise _corrupt(f"tensor {name} has malformed typed values")
                if len(values) + length // itemsize > count:
                    raise _corrupt(f"tensor {name} holds more values than its shape {tensor.dims}")
                values.extend(np.frombuffer(window.get(value, length), code).tolist())
            elif wire == _LEN:
                data, at = window.get(value, length), 0
                while at < length:
                    item, at = _varint(data, at, length)
                    values.append(item)
                    if len(values) > count:
                        raise _corrupt(f"tensor {name} holds more values than its shape {tensor.dims}")
            else:
                _expect(wire, _VARINT, "a tensor's typed values")
                values.append(value)
                if len(values) > count:
                    raise _corrupt(f"tensor {name} holds more values than its shape {tensor.dims}")
    if len(values) != count:
        raise _corrupt(f"tensor {name} of shape {tensor.dims} holds {len(values)} values")
    if fixed is not None:
        return np.array(values, dtype=fixed[0])
    if number == _INT32_DATA:  # protobuf keeps an int32 field's low 32 bits
        values = [((v + (1 << 31)) % (1 << 32)) - (1 << 31) for v in values]
        if tensor.dtype in ("float16", "bfloat16"):  # their bits
            bits = np.array([v & 0xFFFF for v in values], dtype="<u2")
            return bytes_to_array(bits.tobytes(), tensor.dtype)
    elif number == _INT64_DATA:
        values = [_signed(v) for v in values]
    try:
        return np.array(values, dtype=np.dtype(tensor.dtype))
    except OverflowError:
        raise _corrupt(f"tensor {name} holds values outside {tensor.dtype}") from None


def _tensor_ref(source: ByteSource, tensor: _Tensor, files: _ExternalFiles, *, locate: bool) -> TensorRef:
    """A TensorRef that reads the tensor's bytes when asked: from raw_data in the model, an external file, or the
    typed fields. ``locate``: say where the bytes are (to patch them, or fetch a remote file's together); a weight
    that only tells a layer's kind needs neither."""
    shape = tuple(tensor.dims)
    numel = _numel(tensor)
    dtype = tensor.dtype

    def refuse_segment() -> np.ndarray:
        raise _corrupt(f"tensor {_quoted(tensor.name)} is a segment of a larger tensor, which is not read")

    if tensor.segment:
        return TensorRef(dtype, shape, refuse_segment)
    if tensor.location == 1:
        data_source, offset, length = _external_span(tensor, files)
    elif tensor.raw is not None:
        data_source, (offset, length) = source, tensor.raw
    else:
        window = _Window(source)

        def read_typed() -> np.ndarray:
            return _typed_values(window, tensor, numel).reshape(shape)

        return TensorRef(dtype, shape, read_typed)
    _expected_bytes(tensor, numel, length)

    def read() -> np.ndarray:
        data = data_source.read(offset, length)
        if files.many:
            data_source.close()  # a model may name a file per tensor: never hold them all open
        return bytes_to_array(data, dtype).reshape(shape)

    path = data_source.local_path
    if not locate:
        return TensorRef(dtype, shape, read)
    if path is None:  # a remote file: its BatchNorm tensors are fetched together
        return TensorRef(dtype, shape, read, span=(data_source, offset, length))
    return TensorRef(dtype, shape, read, ByteLocation(path, None, offset, contiguous_strides(shape)))


# ---------------------------------------------------------------- BatchNormalization nodes -> layers and calls


def _pytorch_momentum(onnx_momentum: float) -> float:
    """ONNX's momentum is the weight of the running value (running = running * momentum + batch * (1 - momentum),
    the Keras convention, default 0.9); PyTorch's is the weight of the batch. The attribute is a float32: 1 - m is
    taken on its shortest decimal form, so torch's 0.9 (stored as 0.8999999762) comes back as 0.1, not 0.1000000238.
    """
    shortest = Decimal(str(np.float32(onnx_momentum)))
    return float(1 - shortest)


def _float32(value: float) -> float:
    """A float32 attribute as the decimal it was written from (1e-05, not 9.999999747e-06)."""
    return float(str(np.float32(value)))


def _mode(batch_norm: _BatchNorm, opset: int | None) -> tuple[bool, str]:
    """Whether the node normalises with batch statistics, and the evidence: the ``training_mode`` attribute (opset
    14 and later), the ``is_test`` attribute (opsets 1-6, where it defaults to 0: training), and more than one output,
    by which ONNX Runtime's kernel decides at every opset it runs (7 and later). A model that declares no ONNX opset
    is judged by every rule's explicit evidence."""
    attributes = batch_norm.attributes
    evidence = []
    if opset is None or opset >= 14:
        mode = attributes.get(b"training_mode")
        if mode is not None and mode.type == _ATTR_INT and mode.i != 0:
            evidence.append(f"training_mode={mode.i}")
    if opset is None or opset <= 6:
        is_test = attributes.get(b"is_test")
        if is_test is not None and is_test.type == _ATTR_INT:
            if is_test.i == 0:
                evidence.append("is_test=0")
        elif opset is not None:
            evidence.append("is_test unset, so 0")
    outputs = len(batch_norm.node.outputs)
    if outputs > 1 and (opset is None or opset >= 7):
        evidence.append(f"{outputs} outputs")
    return bool(evidence), ", ".join(evidence)


def _call(batch_norm: _BatchNorm, layer: str, opset: int | None) -> RecordedCall:
    training, evidence = _mode(batch_norm, opset)
    attributes = batch_norm.attributes
    epsilon = attributes.get(b"epsilon")
    momentum = attributes.get(b"momentum")
    # the operator's defaults when an attribute is absent (or not a float): what a runtime uses
    eps = epsilon.f if epsilon is not None and epsilon.type == _ATTR_FLOAT else 1e-5
    onnx_momentum = momentum.f if momentum is not None and momentum.type == _ATTR_FLOAT else 0.9
    arguments: list[tuple[str, Any]] = [("training", training), ("eps", _float32(eps))]
    # An inference node never updates its statistics, so its momentum only says how the layer was configured.
    # torch's exporters write 1 there for momentum=None (a cumulative average, which exports as factor 0): nothing
    # to judge. A training node's momentum is the one it applies, and 1 (never moving) is a finding.
    if training or onnx_momentum != 1.0:
        arguments.append(("momentum", _pytorch_momentum(onnx_momentum)))
    source = f"{ONNX_NODE} ({evidence})" if training else ONNX_NODE
    return RecordedCall(layer=layer, source=source, arguments=tuple(arguments))


_LEAVES = ("weight", "bias", "running_mean", "running_var")  # the node's inputs 1-4: scale, B, mean, var


def _layer_name(batch_norm: _BatchNorm) -> str:
    """The layer's name from its statistics' names as torch's exporters keep them, else the node's."""
    inputs = batch_norm.node.inputs
    for index, leaf in ((3, "running_mean"), (4, "running_var")):
        name = _display(inputs[index])
        prefix, dot, last = name.rpartition(".")
        if dot and last == leaf and prefix:
            return prefix
    return _display(batch_norm.node.name) or f"BatchNormalization_{batch_norm.index}"


Resolved = _Tensor | list[float] | None


def _resolve(graph: _Graph, name: bytes) -> Resolved:
    """The stored tensor a node input stands for: an initializer or a Constant, through Identity nodes; None when
    the graph computes it (or takes it as an input) at run time."""
    for _ in range(MAX_IDENTITY_CHAIN):
        if name in graph.initializers:
            return graph.initializers[name]
        if name in graph.constants:
            return graph.constants[name]
        if name not in graph.identities:
            return None
        name = graph.identities[name]
    return None


def open_onnx(source: ByteSource) -> Checkpoint:
    """An ONNX model: each BatchNormalization node's tensors under its layer's ``state_dict`` names and every other
    initializer under its own (all read lazily), and one RecordedCall per node."""
    model = _read_model(source)
    graph = model.graph
    files = _ExternalFiles(source)
    for tensor in graph.initializers.values():
        if tensor.location == 1:  # a model that names a file outside its folder is refused, whichever tensor does
            _external_source(tensor, files)
    refs: dict[int, TensorRef] = {}

    def ref_of(value: _Tensor | list[float], *, locate: bool = True) -> TensorRef:
        if isinstance(value, list):
            return in_memory(np.array(value, dtype=np.float32), "float32")
        if id(value) not in refs:
            refs[id(value)] = _tensor_ref(source, value, files, locate=locate)
        return refs[id(value)]

    layer_tensors: dict[str, TensorRef] = {}
    calls: list[RecordedCall] = []
    layers: dict[str, tuple[bytes, ...]] = {}  # layer -> the input names it was built from
    computed: list[str] = []
    consumed: set[int] = set()
    for batch_norm in graph.batch_norms:
        node = batch_norm.node
        if len(node.inputs) != 5:
            raise _corrupt(
                f"BatchNormalization node {_quoted(node.name)} has {len(node.inputs)} inputs; the operator takes 5"
            )
        key = tuple(node.inputs[1:5])
        layer = _layer_name(batch_norm)
        while layer in layers and layers[layer] != key:  # another node's tensors under the same name
            layer = f"{layer}#{batch_norm.index}"
        layers[layer] = key
        resolved = [_resolve(graph, name) for name in key]
        if resolved[2] is None and resolved[3] is None:
            computed.append(layer)
        for leaf, value in zip(_LEAVES, resolved, strict=True):
            if value is not None:
                consumed.add(id(value))
                layer_tensors[f"{layer}.{leaf}"] = ref_of(value)
        calls.append(_call(batch_norm, layer, model.opset))

    # beside them, every other initializer by its own name (the layer feeding a BatchNorm tells its kind; diff looks
    # for folded statistics among them); an initializer named as a statistic that no BatchNormalization node reads is
    # no layer: left out, with a note
    root: dict[str, TensorRef] = {}
    unused_stats: list[str] = []
    for name, tensor in graph.initializers.items():
        if id(tensor) in consumed:
            continue
        if _display(name).rpartition(".")[2] in STAT_LEAVES:
            unused_stats.append(_display(name))
        else:
            root[_display(name)] = ref_of(tensor, locate=False)
    root.update(layer_tensors)
    return Checkpoint(
        format="onnx",
        root=root,
        notes=_notes(model, unused_stats, computed),
        size_bytes=source.size + files.size,
        calls=tuple(calls),
    )


def _notes(model: _Model, unused_stats: list[str], computed: list[str]) -> tuple[str, ...]:
    graph = model.graph
    notes = []
    if not graph.batch_norms:
        notes.append(
            "no BatchNormalization node in the graph: if the model had BatchNorm layers, the exporter folded them "
            "into the convolution or linear layer before each (torch.onnx.export does in eval mode, unless "
            "do_constant_folding=False, or optimize=False for the dynamo exporter); there are no statistics to check"
        )
    if computed:
        notes.append(
            f"BatchNormalization {_shown_list(computed)} normalise with statistics the graph computes or takes as "
            "inputs at run time, not stored ones: not checked"
        )
    if unused_stats:
        notes.append(
            f"initializers named as BatchNorm statistics feed no BatchNormalization node ({_shown_list(unused_stats)}):"
            " not checked"
        )
    if graph.subgraph_mentions:
        notes.append(
            f"the bodies of {_shown_list(graph.subgraph_mentions)} mention BatchNormalization; nodes inside "
            "control-flow subgraphs are not read"
        )
    if model.function_mentions:
        notes.append(
            f"{model.function_mentions} local function(s) of the model mention BatchNormalization; nodes inside "
            "functions are not read"
        )
    if graph.sparse:
        notes.append(f"{len(graph.sparse)} sparse initializer(s) are not read")
    return tuple(notes)


def _shown_list(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
