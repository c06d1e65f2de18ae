"""safetensors files, single or sharded: the reference parser judges the header, bncheck's ranged reader the bytes.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to its dtype, shape and
``data_offsets`` (relative to the end of the header), then the raw little-endian tensor bytes.

A local file is first opened with the ``safetensors`` package's own parser (``safe_open``), so a file that the
reference loader refuses is refused here too, with its reason. The tensors are then read by bncheck's own reader,
which fetches only the BatchNorm tensors' byte ranges, serves URLs, and decodes bfloat16 without torch.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

from bncheck.errors import CheckpointNotFoundError, CorruptCheckpointError, UnreadableFileError
from bncheck.loaders.dtypes import ITEMSIZE, bytes_to_array
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import ByteLocation, Checkpoint, TensorRef, contiguous_strides

# safetensors header dtype -> torch dtype name
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

# A header is a few bytes per tensor; anything this large is corrupt or hostile, and parsing it would cost memory.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def parse_json(data: bytes, what: str) -> Any:
    """A JSON document of the file, or CorruptCheckpointError: nesting deeper than the parser's recursion limit and
    integers of thousands of digits are refused like any other malformed JSON, not raised as internal errors."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and int() refusing > 4300 digits
        raise CorruptCheckpointError(f"{what} is not valid JSON: {' '.join(str(exc).split())}"[:300]) from exc
    except RecursionError:
        raise CorruptCheckpointError(f"{what} nests too deeply to be a checkpoint's") from None


def read_header(source: ByteSource) -> tuple[dict[str, Any], int]:
    """The parsed JSON header and the absolute offset where tensor data starts."""
    size = source.size
    if size < 8:
        raise CorruptCheckpointError("safetensors file is shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", source.read(0, 8))
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise CorruptCheckpointError(
            f"safetensors header claims {header_len} bytes but the file has {size - 8} after the length field"
        )
    header = parse_json(source.read(8, header_len), "safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object")
    return header, 8 + header_len


# Plain loops rather than all() over a generator: these run once per tensor of the header.
def _valid_shape(shape: Any) -> bool:
    if not isinstance(shape, list):
        return False
    for n in shape:  # noqa: SIM110 (a generator per tensor is the cost avoided)
        if not (isinstance(n, int) and 0 <= n < 2**63):
            return False
    return True


def _valid_offsets(offsets: Any) -> bool:
    if not (isinstance(offsets, list) and len(offsets) == 2):
        return False
    begin, end = offsets
    return isinstance(begin, int) and begin >= 0 and isinstance(end, int) and end >= 0


def _checked_entry(name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """A header entry's dtype, shape and data offsets, checked as the reference parser checks them."""
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"safetensors entry {name!r} is not an object")
    raw_dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(raw_dtype, str) or not _valid_shape(shape) or not _valid_offsets(offsets):
        raise CorruptCheckpointError(f"safetensors entry {name!r} lacks a valid dtype, shape or data_offsets")
    dtype = _dtype(raw_dtype)
    shape_t: tuple[int, ...] = tuple(shape)  # type: ignore[arg-type]  # validated above
    begin, end = offsets  # type: ignore[misc]
    if not begin <= end <= data_size:
        raise CorruptCheckpointError(
            f"tensor {name!r} has data_offsets {offsets} outside the {data_size}-byte data section"
        )
    itemsize = ITEMSIZE.get(dtype)
    if itemsize is not None and math.prod(shape_t) * itemsize != end - begin:
        raise CorruptCheckpointError(
            f"tensor {name!r}: shape {list(shape_t)} of {dtype} needs {math.prod(shape_t) * itemsize} bytes, "
            f"data_offsets give {end - begin}"
        )
    return dtype, shape_t, begin, end


def _dtype(raw_dtype: str) -> str:
    known = SAFETENSORS_DTYPES.get(raw_dtype)
    return known or (raw_dtype.lower() if raw_dtype.isidentifier() else repr(raw_dtype)[:40])


def _tensor_ref(source: ByteSource, dtype: str, shape: tuple[int, ...], start: int, length: int) -> TensorRef:
    def read() -> Any:
        return bytes_to_array(source.read(start, length), dtype).reshape(shape)

    path = source.local_path
    if path is not None:
        return TensorRef(dtype, shape, read, ByteLocation(path, None, start, contiguous_strides(shape)))
    return TensorRef(dtype, shape, read, None, (source, start, length))  # remote: prefetched


def tensors_of(source: ByteSource, *, checked: bool = False) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Every tensor of one safetensors file, in header order, and its ``__metadata__``. ``checked``: the reference
    parser has accepted the file (every entry well formed, in bounds, no overlaps), so the entries are taken as they
    are, without checking them again one by one (a header holds one per tensor: tens of thousands)."""
    header, data_start = read_header(source)
    data_size = source.size - data_start
    metadata = header.pop("__metadata__", None) or {}
    refs = {}
    if checked:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            refs[name] = _tensor_ref(
                source, _dtype(entry["dtype"]), tuple(entry["shape"]), data_start + begin, end - begin
            )
        return refs, metadata if isinstance(metadata, dict) else {}
    for name, entry in header.items():
        dtype, shape, begin, end = _checked_entry(name, entry, data_size)
        refs[name] = _tensor_ref(source, dtype, shape, data_start + begin, end - begin)
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in header.items())
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise CorruptCheckpointError(f"tensors {first!r} and {second!r} overlap in the data section")
    return refs, metadata if isinstance(metadata, dict) else {}


def validate_with_reference(path: Path) -> None:
    """Raise CorruptCheckpointError with the reference parser's reason when ``safe_open`` refuses the file.

    ``safe_open`` parses and checks the header (its size, JSON, dtypes, shapes and offsets: in bounds, without
    gaps or overlaps, covering the whole data section) and maps the file without reading tensor data.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except OSError as exc:
        raise UnreadableFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except SafetensorError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CorruptCheckpointError(f"the safetensors reference parser refuses this file: {reason}"[:300]) from exc


def open_safetensors(source: ByteSource) -> Checkpoint:
    path = source.local_path
    if path is not None:
        validate_with_reference(path)
    refs, _ = tensors_of(source, checked=path is not None)
    return Checkpoint(format="safetensors", root=refs)


def open_sharded(index: ByteSource) -> Checkpoint:
    """A sharded checkpoint from its ``*.index.json`` (Hugging Face layout: ``weight_map`` name -> shard file).

    Shards are opened with whichever loader their bytes call for, so ``pytorch_model.bin.index.json`` works too.
    """
    from bncheck.loaders import open_source_checkpoint  # the shards may be of any format

    if index.size > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"shard index of {index.size} bytes is too large to be one")
    document = parse_json(index.read(0, index.size), "shard index")
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError("shard index has no 'weight_map' of tensor name -> shard file")
    shards: dict[str, dict[str, Any]] = {}
    formats: set[str] = set()
    batch_counter = True
    total = 0
    named: list[str] = []  # every shard's pickle globals: torch.load unpickles each shard of a .bin index
    unread: set[str] = set()
    notes: list[str] = []
    root: dict[str, Any] = {}
    for name, shard_name in weight_map.items():
        if shard_name not in shards:
            if Path(shard_name).is_absolute() or ".." in Path(shard_name).parts or "://" in shard_name:
                raise CorruptCheckpointError(f"shard index names a file outside its folder: {shard_name!r}")
            try:
                shard_source = index.sibling(shard_name)
            except CheckpointNotFoundError:
                raise CorruptCheckpointError(f"shard {shard_name} listed in the index is missing") from None
            shard = open_source_checkpoint(shard_source)
            named.extend(g for g in shard.globals if g not in named)
            if not isinstance(shard.root, dict):
                if not shard.globals:
                    raise CorruptCheckpointError(f"shard {shard_name} does not hold a flat dict of tensors")
                # torch.load has run this shard's pickle by now: its globals are the finding, its tensors unread
                unread.add(shard_name)
                notes.append(f"shard {shard_name} does not hold a flat dict of tensors; its tensors were not read")
            shards[shard_name] = shard.root if isinstance(shard.root, dict) else {}
            formats.add(shard.format)
            batch_counter = batch_counter and shard.batch_counter
            total += shard.size_bytes or 0
        if shard_name in unread:
            continue
        if name not in shards[shard_name]:
            raise CorruptCheckpointError(f"tensor {name!r} is not in shard {shard_name} as the index says")
        root[name] = shards[shard_name][name]
    kind = "/".join(sorted(formats)) or "empty"
    return Checkpoint(
        format=f"{kind}, {len(shards)} shards",
        root=root,
        globals=tuple(named),
        notes=tuple(notes),
        size_bytes=total,
        batch_counter=batch_counter,
    )
