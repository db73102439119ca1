"""Write a model GGUF with some tensors replaced and some added, streaming and atomically.

Metadata records and untouched tensors are copied byte for byte from the source file in chunks;
a replaced tensor is produced (by a callable) only when its turn comes, so one edited tensor at a
time is in memory. The file is written under a temporary name next to the output and renamed into
place once complete.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from gguf import GGUFValueType

from ggsteer.atomic_file import write_atomically
from ggsteer.bake.gguf_layout import GGUFLayout, TensorInfo

_COPY_CHUNK = 16 << 20


Producer = Callable[[], Iterable[bytes]]  # a tensor's bytes, in chunks, made when written


@dataclass(frozen=True)
class AddedTensor:
    info: TensorInfo  # offset is ignored: the writer lays tensors out
    produce: Producer


def encode_record(key: str, value) -> bytes:
    """One metadata record: a string, int (uint32), float (float32), bool, or a list of one of those."""
    value_type, payload = _encode_value(value, key)
    return _string(key) + struct.pack("<I", value_type) + payload


def _encode_value(value, key: str) -> tuple[int, bytes]:
    if isinstance(value, bool):
        return GGUFValueType.BOOL, struct.pack("<?", value)
    if isinstance(value, int):
        return GGUFValueType.UINT32, struct.pack("<I", value)
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, struct.pack("<f", value)
    if isinstance(value, str):
        return GGUFValueType.STRING, _string(value)
    if isinstance(value, (list, tuple)) and value:
        items = [_encode_value(item, key) for item in value]
        item_type = items[0][0]
        if any(t != item_type for t, _ in items):
            raise TypeError(f"metadata {key!r}: array items have different types")
        return GGUFValueType.ARRAY, struct.pack("<IQ", item_type, len(items)) + b"".join(p for _, p in items)
    raise TypeError(f"metadata {key!r}: cannot store {value!r}")


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def write_model_gguf(
    layout: GGUFLayout,
    output: str | os.PathLike,
    *,
    replaced: dict[str, Producer],
    added: Sequence[AddedTensor] = (),
    records: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> None:
    """Write `layout`'s model to `output` with `replaced` tensors' bytes and `added` tensors appended.

    `records` replaces the metadata (key -> raw record); by default the source's own.
    """
    output = Path(output)
    records = dict(layout.records) if records is None else records
    infos = [*layout.tensors.values(), *(item.info for item in added)]
    producers = {**replaced, **{item.info.name: item.produce for item in added}}

    def write(temp: str) -> None:
        with open(temp, "wb") as out, open(layout.path, "rb") as source:
            _write_header(out, layout, infos, records)
            for info in infos:
                if info.name in producers:
                    _write_chunks(out, producers[info.name](), info)
                else:
                    _copy_range(source, out, layout.data_start + info.offset, info.n_bytes)
                _pad(out, layout.alignment)

    write_atomically(output, write, overwrite=overwrite, what="model file")


def _write_header(out, layout: GGUFLayout, infos: list[TensorInfo], records: dict[str, bytes]) -> None:
    out.write(b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(records)))
    for raw in records.values():
        out.write(raw)
    offset = 0
    for info in infos:
        out.write(_string(info.name) + struct.pack("<I", len(info.ne)))
        out.write(struct.pack(f"<{len(info.ne)}Q", *info.ne) + struct.pack("<IQ", int(info.ggml_type), offset))
        offset += -(-info.n_bytes // layout.alignment) * layout.alignment
    _pad(out, layout.alignment)


def _write_chunks(out, chunks: Iterable[bytes], info: TensorInfo) -> None:
    written = 0
    for chunk in chunks:
        out.write(chunk)
        written += len(chunk)
    if written != info.n_bytes:
        raise RuntimeError(f"tensor {info.name!r}: {written} bytes produced, {info.n_bytes} expected")


def copy_producer(layout: GGUFLayout, info: TensorInfo) -> Producer:
    """The source tensor's bytes as they are (e.g. to give a tied output head its own copy)."""
    def produce() -> Iterable[bytes]:
        with open(layout.path, "rb") as source:
            source.seek(layout.data_start + info.offset)
            left = info.n_bytes
            while left:
                chunk = source.read(min(_COPY_CHUNK, left))
                if not chunk:
                    raise RuntimeError(f"{layout.path}: ended while copying tensor {info.name!r}")
                left -= len(chunk)
                yield chunk
    return produce


def _copy_range(source, out, start: int, n_bytes: int) -> None:
    source.seek(start)
    while n_bytes:
        chunk = source.read(min(_COPY_CHUNK, n_bytes))
        if not chunk:
            raise RuntimeError(f"{source.name}: ended while copying tensor data")
        out.write(chunk)
        n_bytes -= len(chunk)


def _pad(out, alignment: int) -> None:
    out.write(b"\0" * (-out.tell() % alignment))
