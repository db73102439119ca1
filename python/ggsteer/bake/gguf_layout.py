"""Read a model GGUF's header without loading it: raw metadata records and tensor extents.

The bake copies every metadata record and every unedited tensor byte for byte, so it keeps each
record's raw bytes and each tensor's place in the file instead of decoding values it does not need.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType


class ModelFileError(ValueError):
    """The model file is not a GGUF model this bake can read (names the file and the problem)."""


_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])

    @property
    def row_length(self) -> int:
        return self.ne[0]


@dataclass
class GGUFLayout:
    path: str
    version: int
    records: dict[str, bytes]  # key -> the record's raw bytes (key, type, value)
    values: dict[str, object]  # key -> value, for scalars and strings only
    tensors: dict[str, TensorInfo]
    alignment: int
    data_start: int

    @property
    def architecture(self) -> str:
        return str(self.values.get("general.architecture", ""))

    def hparam(self, name: str, default=None):
        return self.values.get(f"{self.architecture}.{name}", default)


class _Cursor:
    def __init__(self, handle, size: int, path: str):
        self.handle, self.size, self.path = handle, size, path

    @property
    def offset(self) -> int:
        return self.handle.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.offset:
            raise ModelFileError(f"{self.path}: truncated GGUF file: {what} runs past the end at offset {self.offset}")
        return self.handle.read(n)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        return self.take(self.unpack("<Q", f"length of {what}"), what).decode("utf-8", "replace")


def read_layout(path: str | os.PathLike) -> GGUFLayout:
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: model file not found" if not os.path.exists(path) else f"{path}: not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        cursor = _Cursor(handle, size, path)
        magic = cursor.take(4, "magic") if size >= 4 else b""
        if magic != b"GGUF":
            raise ModelFileError(f"{path}: not a GGUF file (starts with {magic!r})")
        version = cursor.unpack("<I", "version")
        if version not in (2, 3):
            raise ModelFileError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = cursor.unpack("<Q", "tensor count"), cursor.unpack("<Q", "metadata count")
        records, values = {}, {}
        for _ in range(n_kv):
            start = cursor.offset
            key = cursor.string("metadata key")
            values[key] = _read_value(cursor, cursor.unpack("<I", f"type of {key}"), key)
            end = cursor.offset
            handle.seek(start)
            records[key] = handle.read(end - start)  # the raw record, copied as is into the bake
        alignment = int(values.get("general.alignment", _DEFAULT_ALIGNMENT))
        tensors = {}
        for _ in range(n_tensors):
            info = _read_tensor_info(cursor)
            tensors[info.name] = info
        data_start = -(-cursor.offset // alignment) * alignment
    layout = GGUFLayout(path, version, records, values, tensors, alignment, data_start)
    _check_extents(layout, size)
    return layout


def _read_value(cursor: _Cursor, raw_type: int, key: str):
    try:
        value_type = GGUFValueType(raw_type)
    except ValueError:
        raise ModelFileError(f"{cursor.path}: metadata {key!r} has unknown type {raw_type}") from None
    if value_type == GGUFValueType.STRING:
        return cursor.string(f"value of {key}")
    if value_type == GGUFValueType.ARRAY:
        item_type = GGUFValueType(cursor.unpack("<I", f"item type of {key}"))
        count = cursor.unpack("<Q", f"length of {key}")
        # only ggsteer's own arrays are decoded: a tokenizer's 262k strings are just skipped
        keep = key.startswith("ggsteer.")
        if item_type == GGUFValueType.STRING:
            items = [cursor.string(f"item of {key}") for _ in range(count)]
        else:
            fmt = _SCALAR_FORMATS[item_type]
            raw = cursor.take(count * struct.calcsize(fmt), f"items of {key}")
            items = [value for (value,) in struct.iter_unpack(fmt, raw)] if keep else None
        return items if keep else None
    return cursor.unpack(_SCALAR_FORMATS[value_type], f"value of {key}")


def _read_tensor_info(cursor: _Cursor) -> TensorInfo:
    name = cursor.string("tensor name")
    n_dims = cursor.unpack("<I", f"dimension count of {name}")
    if not 1 <= n_dims <= 4:
        raise ModelFileError(f"{cursor.path}: tensor {name!r} has {n_dims} dimensions")
    ne = tuple(cursor.unpack("<Q", f"dimension of {name}") for _ in range(n_dims))
    raw_type = cursor.unpack("<I", f"type of {name}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise ModelFileError(f"{cursor.path}: tensor {name!r} has unknown type {raw_type}") from None
    offset = cursor.unpack("<Q", f"data offset of {name}")
    return TensorInfo(name, ne, ggml_type, offset, math.prod(ne) // block * type_size)


def _check_extents(layout: GGUFLayout, size: int) -> None:
    for info in layout.tensors.values():
        if layout.data_start + info.offset + info.n_bytes > size:
            raise ModelFileError(
                f"{layout.path}: truncated GGUF file: tensor {info.name!r} ends at byte "
                f"{layout.data_start + info.offset + info.n_bytes} but the file has {size} bytes"
            )
