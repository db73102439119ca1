"""A bounds-checked walk over a GGUF header that protects gguf.GGUFReader from corrupted lengths."""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ggsteer.vectors.file.format import VectorFileError

# ---------------------------------------------------------------------------------------------
# Bounds-checked walk over the GGUF header (protects gguf.GGUFReader from corrupted lengths)

_SUPPORTED_GGUF_VERSIONS = (2, 3)
_GGML_MAX_DIMS = 4
_GGML_MAX_NAME = 64
_DEFAULT_ALIGNMENT = 32
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset
_FIXED_VALUE_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}


class _BoundedCursor:
    """Reads little-endian GGUF primitives and refuses to read past the end of the buffer."""

    def __init__(self, buffer: Any, size: int, path: str):
        self.buffer, self.size, self.path, self.offset = buffer, size, path, 0

    def fail(self, problem: str) -> VectorFileError:
        return VectorFileError(f"{self.path}: malformed GGUF file: {problem}")

    def take(self, n_bytes: int, what: str) -> bytes:
        if n_bytes > self.size - self.offset:
            raise self.fail(
                f"{what} needs {n_bytes} bytes at offset {self.offset} but only "
                f"{self.size - self.offset} are left (truncated or corrupted)"
            )
        start, self.offset = self.offset, self.offset + n_bytes
        return self.buffer[start:self.offset]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.u64(f"length of {what}"), what)

    def check_count(self, count: int, min_bytes_each: int, what: str) -> None:
        if count * min_bytes_each > self.size - self.offset:
            raise self.fail(f"{what} count {count} cannot fit in the {self.size - self.offset} bytes left")


def scan_gguf_layout(path: str) -> str | None:
    """Check every count, length and tensor extent of the header; return general.architecture."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise VectorFileError(f"{path}: file is empty, not a GGUF file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _walk_header(_BoundedCursor(buffer, size, path))
    except (FileNotFoundError, VectorFileError):
        raise
    except (OSError, ValueError) as error:  # a directory, no permission, an unmappable file
        problem = f"{type(error).__name__}: {error}"
    raise VectorFileError(f"{path}: cannot read the file ({problem})")


def _walk_header(cursor: _BoundedCursor) -> str | None:
    _check_magic_and_version(cursor)
    n_tensors = cursor.u64("tensor count")
    n_kv = cursor.u64("metadata count")
    cursor.check_count(n_kv, _MIN_KV_BYTES, "metadata")
    architecture, alignment = None, _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cursor.string("metadata key").decode("utf-8", "replace")
        if not key:
            raise cursor.fail("a metadata key is empty")
        value = _skip_value(cursor, cursor.u32(f"type of {key!r}"), key)
        if key == "general.architecture":
            architecture = value if isinstance(value, str) else None
        elif key == "general.alignment":
            alignment = _checked_alignment(cursor, value)
    cursor.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor")
    extents = [_read_tensor_info(cursor) for _ in range(n_tensors)]
    _check_tensor_data_layout(cursor, extents, alignment)
    return architecture


def _check_tensor_data_layout(cursor: _BoundedCursor, extents: list[tuple[str, int, int]], alignment: int) -> None:
    # As ggml's parser (ggml/src/gguf.cpp) requires: tensors back to back, each padded to the alignment.
    pad = lambda n: -(-n // alignment) * alignment  # noqa: E731
    data_start, expected_offset = pad(cursor.offset), 0
    for name, offset, n_bytes in extents:
        if offset != expected_offset:
            raise cursor.fail(f"tensor {name!r} has data offset {offset}, expected {expected_offset}")
        expected_offset += pad(n_bytes)
        if data_start + expected_offset > cursor.size:
            raise cursor.fail(f"data of tensor {name!r} runs past the end of the file (truncated?)")


def _check_magic_and_version(cursor: _BoundedCursor) -> None:
    magic = cursor.take(4, "magic")
    if magic != b"GGUF":
        raise VectorFileError(f"{cursor.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    version = cursor.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise cursor.fail("big-endian GGUF files are not supported (llama.cpp cannot load them either)")
    if version not in _SUPPORTED_GGUF_VERSIONS:
        raise cursor.fail(f"GGUF version {version} is not supported (supported: {_SUPPORTED_GGUF_VERSIONS})")


def _skip_value(cursor: _BoundedCursor, raw_type: int, key: str) -> object:
    """Skip over one metadata value; return it when it is a string or uint32 (for the header keys)."""
    value_type = _value_type(cursor, raw_type, key)
    if value_type == GGUFValueType.STRING:
        return cursor.string(f"value of {key!r}").decode("utf-8", "replace")
    if value_type == GGUFValueType.ARRAY:
        _skip_array(cursor, key)
        return None
    raw = cursor.take(_FIXED_VALUE_SIZES[value_type], f"value of {key!r}")
    return struct.unpack("<I", raw)[0] if value_type == GGUFValueType.UINT32 else None


def _skip_array(cursor: _BoundedCursor, key: str) -> None:
    item_type = _value_type(cursor, cursor.u32(f"item type of {key!r}"), key)
    count = cursor.u64(f"length of {key!r}")
    if item_type == GGUFValueType.ARRAY:
        raise cursor.fail(f"{key!r} is an array of arrays, which GGUF readers do not support")
    if item_type == GGUFValueType.STRING:
        cursor.check_count(count, 8, f"{key!r} item")
        for _ in range(count):
            cursor.string(f"item of {key!r}")
    else:
        cursor.take(count * _FIXED_VALUE_SIZES[item_type], f"items of {key!r}")


def _value_type(cursor: _BoundedCursor, raw_type: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw_type)
    except ValueError:
        raise cursor.fail(f"{key!r} has unknown value type {raw_type}") from None


def _checked_alignment(cursor: _BoundedCursor, value: object) -> int:
    if not isinstance(value, int) or value == 0 or value & (value - 1):
        raise cursor.fail(f"general.alignment must be a uint32 power of two, got {value!r}")
    return value


def _read_tensor_info(cursor: _BoundedCursor) -> tuple[str, int, int]:
    name = cursor.string("tensor name").decode("utf-8", "replace")
    if len(name.encode()) >= _GGML_MAX_NAME:
        raise cursor.fail(f"tensor name {name[:20]!r}... is longer than ggml's limit of {_GGML_MAX_NAME - 1} bytes")
    n_dims = cursor.u32(f"dimension count of {name!r}")
    if not 1 <= n_dims <= _GGML_MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1 .. {_GGML_MAX_DIMS})")
    n_elements = math.prod(cursor.u64(f"dimension of {name!r}") for _ in range(n_dims))
    raw_type = cursor.u32(f"type of {name!r}")
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise cursor.fail(f"tensor {name!r} has unknown type {raw_type}") from None
    if n_elements % block_size:
        raise cursor.fail(f"tensor {name!r} has {n_elements} elements, not a multiple of its block size {block_size}")
    offset = cursor.u64(f"data offset of {name!r}")
    return name, offset, n_elements // block_size * type_size
