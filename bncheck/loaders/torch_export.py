"""torch.export archives (``.pt2``, written by ``torch.export.save``), read without torch.

The archive is a torch zip archive (one folder, named after the file, read with the zip reader's checks) holding,
for each exported program ``<name>`` (``model`` when one program is saved), in torch 2.13's layout
(``torch/export/pt2_archive``):

- ``archive_format`` ("pt2") and ``archive_version`` ("0"), which ``torch.export.load`` checks first;
- ``models/<name>.json``: the serialized program. Its graph lists every op call with its named arguments
  (``aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ...)``), and its
  signature maps each graph input to the parameter, buffer or constant it stands for, by module path
  (``layer1.0.bn1.running_mean``);
- ``data/weights/<name>_weights_config.json`` and ``data/constants/<name>_constants_config.json``: each state-dict
  entry and lifted constant -> the record holding its bytes (``weight_3``), with dtype, sizes, strides and storage
  offset. A record is the raw bytes of one storage, viewed by every tensor that shares it;
- ``data/sample_inputs/<name>.pt``: the example inputs, a torch.save archive;
- ``data/aotinductor/<name>/``: the compiled code of an AOTInductor package, which has no program to read.

Each ``batch_norm`` call becomes a :class:`RecordedCall` of the layer whose statistics it reads, with its training
flag, momentum and eps. Only the BatchNorm tensors' bytes are read, in place, never the convolution weights.

Nothing is run. ``torch.export.load`` unpickles the sample inputs (``torch.load``, falling back to
``weights_only=False`` when that fails), tensors stored as pickles (tensor subclasses, ``weights_only=False``),
legacy ``data/weights/<name>.pt`` files, and opaque constants (``pickle.loads``): bncheck reads them all with its
restricted unpickler, and their globals are graded as any pickle's are. TorchScript custom objects go to
TorchScript's own unpickler, which resolves only registered classes; they are noted, not read. The program's
symbolic shape expressions, which ``torch.export.load`` evaluates with ``sympy.sympify``, are never parsed.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

from bncheck.errors import BncheckError, CorruptCheckpointError, UnsupportedFormatError
from bncheck.loaders.dtypes import ITEMSIZE
from bncheck.loaders.files import ByteSource
from bncheck.loaders.interface import EXPORTED_PROGRAM, Checkpoint, RecordedCall, TensorRef, without_data
from bncheck.loaders.restricted_pickle import globals_of, scan_globals
from bncheck.loaders.safetensors import parse_json
from bncheck.loaders.torch_zip import TorchArchive, open_archive, open_torch_zip, scan_uncovered

# A program is about 2 KB per op call (one JSON object or list per 35 bytes) and a configuration a few hundred bytes
# per tensor. json.loads holds about eight times a real program in memory, and up to 24 times JSON made of empty
# objects: a member larger than this, or opening more objects and lists than this, is refused before it is parsed
# (at worst about 500 MiB while parsing).
MAX_JSON_BYTES = 32 * 1024 * 1024
MAX_JSON_CONTAINERS = MAX_JSON_BYTES // 16
# Dtypes as the serialized program and configurations number them (torch._export.serde.schema.ScalarType).
_SCALAR_TYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    9: "complex32",
    10: "complex64",
    11: "complex128",
    12: "bool",
    13: "bfloat16",
    28: "uint16",
    29: "float8_e4m3fn",
    30: "float8_e5m2",
    31: "float8_e4m3fnuz",
    32: "float8_e5m2fnuz",
    33: "float8_e8m0fnu",
    34: "uint32",
    35: "uint64",
}
# The BatchNorm ops an exported graph can call, and the training flag an op implies when it takes none: the export
# IR (aten.batch_norm), the core ATen IR after run_decompositions(), and the ops of earlier export IRs.
_BATCH_NORM_OPS: dict[str, bool | None] = {
    "torch.ops.aten.batch_norm.default": None,
    "torch.ops.aten.native_batch_norm.default": None,
    "torch.ops.aten._native_batch_norm_legit.default": None,
    "torch.ops.aten._native_batch_norm_legit.no_stats": None,
    "torch.ops.aten._native_batch_norm_legit_functional.default": None,
    "torch.ops.aten._native_batch_norm_legit_no_training.default": False,
    "torch.ops.aten._batch_norm_with_update.default": True,
    "torch.ops.aten._batch_norm_with_update_functional.default": True,
    "torch.ops.aten._batch_norm_no_update.default": False,
    "torch.ops.aten.cudnn_batch_norm.default": None,
    "torch.ops.aten.miopen_batch_norm.default": None,
}
# cudnn_batch_norm and miopen_batch_norm name momentum and eps otherwise
_ARGUMENT_NAMES = {"exponential_average_factor": "momentum", "epsilon": "eps"}
# Nested graphs (the branches of torch.cond, the body of torch.map) are searched this deep for BatchNorm calls.
_MAX_GRAPH_DEPTH = 16
_MAX_RECORD_BYTES = 64
# An opaque constant's pickle is read by the restricted unpickler up to this size; of a larger one, the opcodes of
# this many bytes are scanned.
MAX_OPAQUE_PICKLE_BYTES = 64 * 1024 * 1024


def holds_exported_program(source: ByteSource) -> bool:
    """Whether a zip archive is torch.export's rather than torch.save's: it has the ``archive_format`` record that
    ``torch.export.load`` checks, and no ``data.pkl`` for ``torch.load`` to unpickle (an archive with both is read
    as torch.save's, whose pickle torch.load would run). An archive torch's reader refuses is left to the zip reader,
    which says why."""
    try:
        with open_archive(source) as archive:
            return archive.find("data.pkl") is None and archive.find("archive_format") is not None
    except BncheckError:
        return False


def _record(archive: TorchArchive, name: str) -> str | None:
    """A short text record (``archive_format``, ``archive_version``); a long one is described, not read."""
    info = archive.find(name)
    if info is None:
        return None
    if info.file_size > _MAX_RECORD_BYTES:
        return f"<{info.file_size} bytes>"
    return archive.read_full(info).decode("utf-8", "replace")


def _json(archive: TorchArchive, info: zipfile.ZipInfo) -> Any:
    name = info.filename.removeprefix(archive.prefix)
    if info.file_size > MAX_JSON_BYTES:
        raise CorruptCheckpointError(
            f"{name} declares {info.file_size} bytes: more than bncheck parses ({MAX_JSON_BYTES})"
        )
    data = archive.read_full(info)
    containers = data.count(b"{") + data.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise CorruptCheckpointError(
            f"{name} opens {containers} objects and lists: more than bncheck parses ({MAX_JSON_CONTAINERS})"
        )
    return parse_json(data, name)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{what} is not a JSON object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise CorruptCheckpointError(f"{what} is not a JSON list")
    return value


def _int(value: Any, what: str) -> int:
    """A concrete integer of a tensor's metadata (``{"as_int": n}``); symbolic ones are refused, as torch does."""
    number = value.get("as_int") if isinstance(value, dict) else None
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**63:
        raise CorruptCheckpointError(f"{what} is not a concrete non-negative integer"[:300])
    return number


class _Reader:
    """One archive's programs, payloads and pickles, read into a Checkpoint."""

    def __init__(self, archive: TorchArchive) -> None:
        self.archive = archive
        self.notes: list[str] = []
        self.globals: list[str] = []

    def untrusted(self, names: tuple[str, ...]) -> None:
        self.globals += [name for name in names if name not in self.globals]

    def nested(self, info: zipfile.ZipInfo, what: str) -> Checkpoint:
        """A torch.save archive stored as a member, read by the zip reader (its pickle graded, never run)."""
        name = info.filename.removeprefix(self.archive.prefix)
        try:
            checkpoint = open_torch_zip(self.archive.member_source(info))
        except BncheckError as exc:
            raise type(exc)(f"{what} {name}: {exc}"[:500]) from exc
        self.untrusted(checkpoint.globals)
        self.notes += [f"{name}: {note}" for note in checkpoint.notes]
        return checkpoint

    def opaque_globals(self, record: zipfile.ZipInfo) -> tuple[str, ...]:
        """The globals a plain pickle names: read by the restricted unpickler, or from the opcodes of its first
        ``MAX_OPAQUE_PICKLE_BYTES`` when it is larger."""
        if record.file_size <= MAX_OPAQUE_PICKLE_BYTES:
            return globals_of(self.archive.read_full(record))
        source = self.archive.member_source(record)
        return scan_globals(io.BytesIO(source.read(0, MAX_OPAQUE_PICKLE_BYTES)))

    def payloads(self, model: str, kind: str) -> dict[str, TensorRef]:
        """The tensors of ``data/weights`` or ``data/constants`` for one program, by name."""
        folder = f"data/{kind}/"
        legacy = self.archive.find(f"{folder}{model}.pt")
        if legacy is not None:  # an earlier layout, still loaded by torch: one torch.save of the whole dict
            root = self.nested(legacy, kind).root
            if not isinstance(root, dict):
                raise CorruptCheckpointError(f"{folder}{model}.pt does not hold a dict of tensors")
            return {str(name): ref for name, ref in root.items() if isinstance(ref, TensorRef)}
        config_name = f"{folder}{model}_{kind}_config.json"
        info = self.archive.find(config_name)
        if info is None:
            raise CorruptCheckpointError(f"{config_name} is missing: torch.export.load cannot read this archive")
        entries = _object(_object(_json(self.archive, info), config_name).get("config"), f"{config_name} config")
        tensors: dict[str, TensorRef] = {}
        record_dtypes: dict[str, tuple[str, str]] = {}
        pickled = custom = 0
        for name, entry in entries.items():
            what = f"{config_name} entry {name!r:.80}"
            entry = _object(entry, what)
            path = entry.get("path_name")
            if not isinstance(path, str):
                raise CorruptCheckpointError(f"{what} has no path_name")
            record = self.archive.find(folder + path)
            if record is None:
                raise CorruptCheckpointError(f"{what} names {folder}{path:.80}, which is missing")
            if entry.get("use_pickle") is True:
                if path.startswith("custom_obj_"):
                    custom += 1
                elif path.startswith("opaque_obj_"):  # torch.export.load runs pickle.loads on it
                    self.untrusted(self.opaque_globals(record))
                else:
                    nested = self.nested(record, "pickled tensor")
                    if isinstance(nested.root, TensorRef):
                        tensors[name] = nested.root
                    else:
                        pickled += 1
                continue
            dtype, ref = self.tensor(entry.get("tensor_meta"), record, what)
            first = record_dtypes.setdefault(path, (name, dtype))
            if first[1] != dtype:
                # torch views a record with the dtype of the first entry naming it, whatever the others say
                raise CorruptCheckpointError(f"{name!r:.80} and {first[0]!r:.80} view {path:.80} as different dtypes")
            tensors[name] = ref
        if pickled:
            self.notes.append(f"{pickled} {kind} stored as pickled tensor subclasses were scanned, not read")
        if custom:
            self.notes.append(f"{custom} TorchScript custom objects among the {kind} were not read")
        return tensors

    def tensor(self, meta: Any, record: zipfile.ZipInfo, what: str) -> tuple[str, TensorRef]:
        """A tensor as ``torch.as_strided`` views its record: the record read as a flat array of the tensor's dtype,
        then sizes, strides and storage offset in elements."""
        meta = _object(meta, f"{what} tensor_meta")
        code = meta.get("dtype")
        dtype = _SCALAR_TYPES.get(code) if isinstance(code, int) else None
        if dtype is None:
            raise CorruptCheckpointError(f"{what} has an unknown dtype {code!r:.40}")
        size = tuple(_int(n, f"{what} size") for n in _list(meta.get("sizes"), f"{what} sizes"))
        stride = tuple(_int(n, f"{what} stride") for n in _list(meta.get("strides"), f"{what} strides"))
        offset = _int(meta.get("storage_offset"), f"{what} storage offset")
        if record.file_size == 0 and 0 not in size:
            return dtype, without_data(dtype, size, "empty record, which torch.export.load fills with zeros")
        if record.file_size % ITEMSIZE[dtype]:  # torch reads a record as whole elements of the dtype, or refuses it
            raise CorruptCheckpointError(f"{what}: its {record.file_size}-byte record is not whole {dtype} elements")
        return dtype, self.archive.member_tensor(record, offset, size, stride, dtype, record.file_size)

    def program(self, info: zipfile.ZipInfo) -> list[RecordedCall]:
        """Every BatchNorm call of one serialized program, named by the layer whose statistics it reads."""
        name = info.filename.removeprefix(self.archive.prefix)
        document = _object(_json(self.archive, info), name)
        module = _object(document.get("graph_module"), f"{name} graph_module")
        signature = _object(module.get("signature"), f"{name} signature")
        inputs: dict[str, str] = {}  # graph input -> the parameter or buffer it stands for
        for spec in _list(signature.get("input_specs"), f"{name} input_specs"):
            for kind, key in (("parameter", "parameter_name"), ("buffer", "buffer_name")):
                found = spec.get(kind) if isinstance(spec, dict) else None
                if isinstance(found, dict) and isinstance(found.get(key), str):
                    argument = found.get("arg")
                    if isinstance(argument, dict) and isinstance(argument.get("name"), str):
                        inputs[argument["name"]] = found[key]
        calls = []
        for node in _nodes(_object(module.get("graph"), f"{name} graph"), name, 0):
            call = _batch_norm_call(node, inputs, name)
            if call is not None:
                calls.append(call)
        return calls


def _nodes(graph: dict[str, Any], where: str, depth: int) -> Iterator[dict[str, Any]]:
    """The graph's op calls, and those of the graphs nested in them (control flow), depth first."""
    if depth > _MAX_GRAPH_DEPTH:
        raise CorruptCheckpointError(f"{where} nests graphs more than {_MAX_GRAPH_DEPTH} deep")
    for node in _list(graph.get("nodes"), f"{where} nodes"):
        if not isinstance(node, dict):
            raise CorruptCheckpointError(f"{where} has a node that is not a JSON object")
        yield node
        for named in _named_inputs(node):
            argument = named.get("arg")
            nested = argument.get("as_graph") if isinstance(argument, dict) else None
            if isinstance(nested, dict) and isinstance(nested.get("graph"), dict):
                yield from _nodes(nested["graph"], where, depth + 1)


def _named_inputs(node: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A node's named arguments (``{"name": ..., "arg": {...}}``); anything else it lists is no argument."""
    named = node.get("inputs")
    return [item for item in named if isinstance(item, dict)] if isinstance(named, list) else []


def _value(argument: Any) -> Any:
    """A serialized argument's value: a tensor's name, or a literal (bool, number, None)."""
    if not isinstance(argument, dict) or len(argument) != 1:
        return None
    ((kind, value),) = argument.items()
    if kind in ("as_tensor", "as_optional_tensor"):
        return _value(value) if kind == "as_optional_tensor" else value.get("name") if isinstance(value, dict) else None
    if kind in ("as_bool", "as_float", "as_int"):
        return value
    return None


def _module_path(node: Mapping[str, Any]) -> str | None:
    """The path of the module that made the call, from the node's ``nn_module_stack`` (``key,path,class;...``, the
    innermost module last)."""
    metadata = node.get("metadata")
    stack = metadata.get("nn_module_stack") if isinstance(metadata, dict) else None
    if not isinstance(stack, str):
        return None
    parts = stack.rsplit(";", 1)[-1].split(",")
    return parts[1] if len(parts) == 3 and parts[1] else None


def _batch_norm_call(node: Mapping[str, Any], inputs: Mapping[str, str], where: str) -> RecordedCall | None:
    """The call's training flag, momentum and eps, for the layer whose statistics (else affine parameters, else
    calling module) it uses; None for any other op, or a call that names no layer."""
    target = node.get("target")
    if not isinstance(target, str) or target not in _BATCH_NORM_OPS:
        return None
    arguments: dict[str, Any] = {}
    for named in _named_inputs(node):
        if isinstance(named.get("name"), str):
            arguments[_ARGUMENT_NAMES.get(named["name"], named["name"])] = _value(named.get("arg"))
    training = _BATCH_NORM_OPS[target]
    if training is None:
        training = arguments.get("training")
        if not isinstance(training, bool):
            raise CorruptCheckpointError(f"{where}: a {target} call without a training flag")
    layer = None
    for tensor in ("running_mean", "running_var", "weight", "bias"):
        argument = arguments.get(tensor)
        if isinstance(argument, str) and argument in inputs:
            layer = inputs[argument].rpartition(".")[0]
            break
    layer = layer if layer is not None else _module_path(node)
    if layer is None:
        return None
    recorded: list[tuple[str, Any]] = [("training", training)]
    momentum = arguments.get("momentum")
    # in eval mode the kernel never uses momentum, and a module built with momentum=None passes 0.0 for it
    if training or momentum != 0:
        recorded.append(("momentum", momentum))
    recorded.append(("eps", arguments.get("eps")))
    return RecordedCall(layer, EXPORTED_PROGRAM, tuple(recorded))


def _no_program(archive: TorchArchive) -> UnsupportedFormatError:
    """Why a .pt2 archive without a serialized program cannot be checked."""
    names = [info.filename.removeprefix(archive.prefix) for info in archive.infos]
    if any(name.startswith("data/aotinductor/") for name in names):
        return UnsupportedFormatError(
            "an AOTInductor package (compiled code in data/aotinductor/) without a serialized program: its BatchNorm"
            " layers are compiled into the code; check the torch.export.save archive it was compiled from"
        )
    if any(name.startswith("data/executorch/") for name in names):
        return UnsupportedFormatError("an ExecuTorch package without a serialized program (models/*.json)")
    return UnsupportedFormatError("a .pt2 archive without a serialized program (models/*.json): nothing to check")


def open_torch_export(source: ByteSource) -> Checkpoint:
    with open_archive(source) as archive:
        found = _record(archive, "archive_format")
        if found != "pt2":
            raise UnsupportedFormatError(f"archive_format record says {found!r:.40}, not 'pt2': not a .pt2 archive")
        version = _record(archive, "archive_version")
        if version != "0":
            raise UnsupportedFormatError(
                f"archive_version {version!r:.40}: torch 2.13 and bncheck read version '0' .pt2 archives"
            )
        reader = _Reader(archive)
        models = {
            info.filename.removeprefix(archive.prefix + "models/").removesuffix(".json"): info
            for info in archive.infos
            if info.filename.startswith(archive.prefix + "models/") and info.filename.endswith(".json")
        }
        if not models:
            raise _no_program(archive)
        programs: dict[str, dict[str, TensorRef]] = {}
        calls: list[RecordedCall] = []
        for model, info in models.items():
            calls += reader.program(info)
            weights = reader.payloads(model, "weights")
            constants = reader.payloads(model, "constants")
            clash = next((name for name in constants if name in weights), None)
            if clash is not None:
                raise CorruptCheckpointError(f"{clash!r:.80} is both a weight and a constant of program {model!r:.80}")
            programs[model] = {**weights, **constants}
            inputs = archive.find(f"data/sample_inputs/{model}.pt")
            if inputs is None:
                reader.notes.append(f"program {model!r:.80} has no sample inputs: torch.export.load refuses it")
            else:
                reader.nested(inputs, "sample inputs")
        if any(info.filename.startswith(f"{archive.prefix}data/aotinductor/") for info in archive.infos):
            reader.notes.append("the archive also holds AOTInductor compiled code, which was not read")
        notes, hidden = scan_uncovered(archive)
        reader.untrusted(hidden)
        # one program (torch.export.save writes one, named "model") is a state dict; several are one each
        root: Any = next(iter(programs.values())) if len(programs) == 1 else programs
        return Checkpoint(
            format="torch export",
            root=root,
            globals=tuple(reader.globals),
            notes=tuple(archive.notes + reader.notes + notes),
            calls=tuple(calls),
        )
