"""The safetensors header validator against malformed headers: every case is a clear CorruptCheckpoint."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from lmsurgeon.errors import CorruptCheckpoint
from lmsurgeon.io.header import MAX_HEADER_BYTES, header_length, parse_header


def blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def parse(file_bytes: bytes):
    n = header_length(file_bytes[:8], "f.safetensors", len(file_bytes))
    return parse_header(file_bytes[8 : 8 + n], "f.safetensors", len(file_bytes))


def test_a_real_safetensors_file_parses_to_the_same_offsets_safetensors_uses():
    data = save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)})
    tensors, _ = parse(data)
    a = tensors["a"]
    assert (a.dtype, a.shape, a.nbytes) == ("F32", (2, 3), 24)
    assert torch.frombuffer(bytearray(data[a.begin : a.end]), dtype=torch.float32).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not match"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}, b"\0" * 4, "exceeds the data buffer"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "increasing"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, "two integers"),
        ({"w": [1, 2]}, b"", "not an object"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_entries_are_named(header, data, message):
    with pytest.raises(CorruptCheckpoint, match=message):
        parse(blob(header, data))


def test_header_length_past_the_file_or_cap_is_refused_before_reading():
    with pytest.raises(CorruptCheckpoint, match="past the end"):
        header_length(struct.pack("<Q", 1000), "f", 100)
    with pytest.raises(CorruptCheckpoint, match="cap"):
        header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), "f", None)
    with pytest.raises(CorruptCheckpoint, match="shorter"):
        header_length(b"\1\2", "f", 2)


def test_non_json_non_utf8_and_duplicate_names_are_refused():
    with pytest.raises(CorruptCheckpoint, match="UTF-8"):
        parse_header(b"\xff\xfe{}", "f", None)
    with pytest.raises(CorruptCheckpoint, match="not valid JSON"):
        parse_header(b"{nope", "f", None)
    dup = (
        b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "w": {"dtype": "F32", "shape": [0], '
        b'"data_offsets": [0, 0]}}'
    )
    with pytest.raises(CorruptCheckpoint, match="twice"):
        parse_header(dup, "f", None)
