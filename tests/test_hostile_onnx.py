"""Crafted ONNX files, written field by field: each ends in a report or a one-line error (exit 2), in bounded time
and memory, and never reads what it does not need."""

from __future__ import annotations

import resource
import struct
import time
from pathlib import Path

import pytest

from bncheck.loaders.onnx import MAX_FIELDS, MAX_GRAPH_ENTRIES, MAX_INITIALIZERS, MAX_NAME_BYTES


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def field(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def number_field(number: int, value: int) -> bytes:
    return key(number, 0) + varint(value)


def model(graph: bytes, opset: int = 15) -> bytes:
    return number_field(1, 9) + field(7, graph) + field(8, number_field(2, opset))


def tensor(name: bytes, dims: list[int], raw: bytes, data_type: int = 1) -> bytes:
    return b"".join(number_field(1, d) for d in dims) + number_field(2, data_type) + field(8, name) + field(9, raw)


def node(op: bytes, inputs: list[bytes], outputs: list[bytes], *attributes: bytes) -> bytes:
    return (
        b"".join(field(1, name) for name in inputs)
        + b"".join(field(2, name) for name in outputs)
        + field(4, op)
        + b"".join(field(5, attribute) for attribute in attributes)
    )


def float_attribute(name: bytes, value: float) -> bytes:
    return field(1, name) + number_field(20, 1) + key(2, 5) + struct.pack("<f", value)


STATS = [b"bn.weight", b"bn.bias", b"bn.running_mean", b"bn.running_var"]


def batch_norm_graph(*, stats: bytes | None = None, extra: bytes = b"") -> bytes:
    """One BatchNormalization node over four 3-channel initializers (or ``stats`` instead of them)."""
    values = struct.pack("<3f", 1.0, 2.0, 3.0)
    initializers = b"".join(field(5, tensor(name, [3], values)) for name in STATS) if stats is None else stats
    return field(1, node(b"BatchNormalization", [b"X", *STATS], [b"Y"], float_attribute(b"epsilon", 1e-5))) + (
        initializers + extra
    )


def inspect_crafted(cli, path: Path, data: bytes) -> dict:
    path.write_bytes(data)
    start = time.perf_counter()
    result = cli("inspect", path, "--json")
    assert time.perf_counter() - start < 10
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    return result.json()["files"][0]


def refused(cli, tmp_path: Path, data: bytes, reason: str) -> None:
    file = inspect_crafted(cli, tmp_path / "crafted.onnx", data)
    assert file["error"] is not None, file
    assert file["error"]["code"] == "corrupt" and "\n" not in file["error"]["message"]
    assert reason in file["error"]["message"], file["error"]["message"]


def test_a_well_formed_crafted_model_is_read(cli, tmp_path: Path) -> None:
    file = inspect_crafted(cli, tmp_path / "ok.onnx", model(batch_norm_graph()))
    assert file["error"] is None and [layer["name"] for layer in file["layers"]] == ["bn"]


def test_more_graph_entries_than_any_model(cli, tmp_path: Path) -> None:
    empty_nodes = field(1, b"") * (MAX_GRAPH_ENTRIES + 1)  # two-byte nodes
    refused(cli, tmp_path, model(empty_nodes), f"more than {MAX_GRAPH_ENTRIES} nodes and initializers")


def test_more_initializers_than_any_model(cli, tmp_path: Path) -> None:
    names = (field(5, tensor(b"w%d.weight" % i, [1, 1], bytes(4))) for i in range(MAX_INITIALIZERS + 1))
    refused(cli, tmp_path, model(b"".join(names)), f"more than {MAX_INITIALIZERS} initializers")


def test_more_fields_than_any_model(cli, tmp_path: Path) -> None:
    value_infos = field(13, b"") * (MAX_FIELDS + 1)  # empty value_info entries
    refused(cli, tmp_path, model(value_infos), f"more than {MAX_FIELDS} protobuf fields")


def test_a_gigabyte_doc_string_is_skipped_unread(cli, tmp_path: Path) -> None:
    # a 1 GiB payload declared in a sparse file: read, it would cost a gigabyte; skipped by its length, nothing
    path = tmp_path / "doc.onnx"
    head = model(batch_norm_graph()) + key(6, 2) + varint(1 << 30)
    with path.open("wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + (1 << 30))
    start = time.perf_counter()
    from bncheck.api import inspect_file

    report = inspect_file(path)
    assert time.perf_counter() - start < 10
    assert report.error is None and [layer.name for layer in report.layers] == ["bn"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (number_field(1, 9) + key(7, 2) + varint(1 << 40), "runs past the end of its message"),
        (number_field(1, 9) + key(7, 2) + b"\xff\xff\xff", "malformed or truncated varint"),
        (number_field(1, 9) + b"\xff" * 11, "malformed or truncated varint"),
        (number_field(1, 9) + key(7, 3), "wire type 3"),
        (number_field(1, 9) + key(0, 0) + b"\x00", "a field numbered 0"),
        # op_type as a varint, in a node that names Identity (others are skipped unparsed)
        (model(field(1, field(1, b"Identity") + number_field(4, 7))), "wire type 0, not 2"),
        (model(field(1, field(3, b"n" * (MAX_NAME_BYTES + 1)) + field(4, b"Identity"))), "names are at most"),
        (model(field(5, b"".join(number_field(1, 1) for _ in range(100)))), "more than 64 dimensions"),
        (model(batch_norm_graph(extra=field(5, tensor(b"bn.weight", [3], bytes(12))))), "two initializers named"),
        (model(field(1, node(b"BatchNormalization", [b"X", b"a", b"b"], [b"Y"]))), "has 3 inputs"),
    ],
    ids=[
        "length-past-end",
        "truncated-varint",
        "eleven-byte-varint",
        "group",
        "field-zero",
        "wrong-wire-type",
        "long-name",
        "many-dims",
        "duplicate-initializer",
        "three-inputs",
    ],
)
def test_malformed_structure_is_one_line(cli, tmp_path: Path, data: bytes, reason: str) -> None:
    refused(cli, tmp_path, data, reason)


def test_an_astronomic_shape_over_a_few_bytes_is_refused_without_allocating(cli, tmp_path: Path) -> None:
    huge = b"".join(field(5, tensor(name, [1 << 40, 1 << 40], bytes(12))) for name in STATS)
    refused(cli, tmp_path, model(batch_norm_graph(stats=huge)), "needs 4835703278458516698824704 bytes")
    negative = b"".join(field(5, tensor(name, [(1 << 64) - 3], bytes(12))) for name in STATS)
    refused(cli, tmp_path, model(batch_norm_graph(stats=negative)), "negative dimension [-3]")


def test_typed_values_claimed_beyond_what_is_stored(cli, tmp_path: Path) -> None:
    # float_data (field 4) with three floats for a shape of 2**30: refused when read, nothing allocated for the shape
    typed = b"".join(
        field(5, number_field(1, 1 << 30) + number_field(2, 1) + field(8, name) + field(4, bytes(12))) for name in STATS
    )
    file = inspect_crafted(cli, tmp_path / "typed.onnx", model(batch_norm_graph(stats=typed)))
    assert file["error"] is not None and "values outside raw_data" in file["error"]["message"]


def test_an_identity_cycle_ends(cli, tmp_path: Path) -> None:
    cycle = field(1, node(b"Identity", [b"bn.running_var"], [b"bn.running_mean"])) + field(
        1, node(b"Identity", [b"bn.running_mean"], [b"bn.running_var"])
    )
    weights = b"".join(field(5, tensor(name, [3], bytes(12))) for name in STATS[:2])
    file = inspect_crafted(cli, tmp_path / "cycle.onnx", model(batch_norm_graph(stats=weights + cycle)))
    assert file["error"] is None and file["layers"] == []
    assert any("computes or takes as inputs" in note for note in file["notes"])


def test_peak_memory_of_this_test_process_stays_bounded() -> None:
    # runs last in this module: the crafted graphs above (up to 10 MB each) cost far less than a gigabyte
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak_kib < 1024 * 1024, peak_kib
