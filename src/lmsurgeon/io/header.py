"""Parse and validate a safetensors header without trusting it.

Layout: u64 little-endian N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}`` (optional
``__metadata__``), then the data buffer. Every check here exists because the file may come from a stranger:
a header length past the file, offsets out of range or overlapping, a byte count that disagrees with
dtype × shape, or an unknown dtype must be a clear error, never a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmsurgeon.errors import CorruptCheckpoint

#: bytes per element of every dtype safetensors defines
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
#: the reference implementation refuses headers over 100 MB; so do we, before reading them
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it (or a row range of it) with a single ranged read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def row_bytes(self) -> int:
        """Bytes of one leading-axis row (the whole tensor for a scalar)."""
        return self.itemsize * math.prod(self.shape[1:]) if self.shape else self.nbytes


def header_length(prefix: bytes, file: str, file_size: int | None) -> int:
    """Decode the leading u64 and check it against the file size and a sane cap."""
    if len(prefix) < 8:
        raise CorruptCheckpoint("not a safetensors file: shorter than its 8-byte header length", file)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0:
        raise CorruptCheckpoint("safetensors header length is 0", file)
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpoint(f"safetensors header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap", file)
    if file_size is not None and 8 + n > file_size:
        raise CorruptCheckpoint(
            f"safetensors header length {n} runs past the end of the file ({file_size} bytes)", file
        )
    return n


def parse_header(raw: bytes, file: str, file_size: int | None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header ``raw`` (without its 8-byte prefix) and return tensors and metadata.

    ``file_size`` (when known) bounds the data; ``None`` skips that check for sources whose size is unknown.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptCheckpoint("safetensors header is not valid UTF-8", file) from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates(file))
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"safetensors header is not valid JSON ({e.msg} at byte {e.pos})", file) from None
    if not isinstance(obj, dict):
        raise CorruptCheckpoint("safetensors header is not a JSON object", file)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptCheckpoint("safetensors __metadata__ must map strings to strings", file)
    data_start = 8 + len(raw)
    data_len = None if file_size is None else file_size - data_start
    tensors = {name: _tensor_info(name, spec, file, data_start, data_len) for name, spec in obj.items()}
    _check_no_overlap(tensors, file)
    return tensors, metadata


def _reject_duplicates(file: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise CorruptCheckpoint(f"safetensors header names tensor {dup!r} twice", file)
        return dict(pairs)

    return hook


def _tensor_info(name: str, spec: object, file: str, data_start: int, data_len: int | None) -> TensorInfo:
    if not isinstance(spec, dict):
        raise CorruptCheckpoint(f"tensor {name!r}: header entry is not an object", file)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CorruptCheckpoint(f"tensor {name!r}: unknown dtype {dtype!r}", file)
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise CorruptCheckpoint(f"tensor {name!r}: shape must be a list of non-negative integers", file)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CorruptCheckpoint(f"tensor {name!r}: data_offsets must be two integers", file)
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CorruptCheckpoint(f"tensor {name!r}: data_offsets {offsets} are not an increasing range", file)
    if data_len is not None and end > data_len:
        raise CorruptCheckpoint(
            f"tensor {name!r}: data_offsets end {end} exceeds the data buffer ({data_len} bytes)", file
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CorruptCheckpoint(
            f"tensor {name!r}: {end - begin} bytes do not match dtype {dtype} × shape {shape} ({expected})", file
        )
    return TensorInfo(name, dtype, tuple(shape), file, data_start + begin, data_start + end)


def _check_no_overlap(tensors: dict[str, TensorInfo], file: str) -> None:
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise CorruptCheckpoint(f"tensors {n0!r} and {n1!r} overlap in the data buffer", file)
