"""Reading and validating control-vector GGUF files written by ggsteer, repeng or llama.cpp."""

from __future__ import annotations

import errno
import os
import struct
import warnings
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from ggsteer.vectors.file.format import (
    ARCHITECTURE,
    DIRECTION_NAME,
    FORMAT_VERSION,
    GGSTEER_PREFIX,
    LAYER_COUNT_KEY,
    MODEL_HINT_KEY,
    VectorFile,
    VectorFileError,
    VectorFileWarning,
)
from ggsteer.vectors.file.scan import scan_gguf_layout
from ggsteer.vectors.file.schema import (
    FLOAT_GGUF_TYPES,
    INTEGER_GGUF_TYPES,
    LAYER_LIST_KEYS,
    METADATA_KEYS,
    MetadataSpec,
    check_metadata_consistency,
    normalize_metadata_value,
    show,
)
from ggsteer.vectors.file.write import check_finite

# ---------------------------------------------------------------------------------------------
# Reading


def read_vector_file(path: str | os.PathLike[str], *, layer_offset: int = 0) -> VectorFile:
    """Read and validate a control-vector GGUF file (ggsteer's, repeng's, llama.cpp's).

    Tensor ``direction.N`` becomes layer ``N + layer_offset``. The default 0 matches how llama.cpp
    applies a file (to the output of block N); use -1 for files from llama.cpp's
    cvector-generator to get the layer each direction was measured at. A resulting layer 0 is
    kept (ggsteer's own hooks can steer block 0, though llama.cpp cannot and such a vector cannot
    be written back); a result below 0 is an error. With an offset, ggsteer.layers and
    ggsteer.recommended_layers in ``metadata`` are moved by the same amount.

    Raises FileNotFoundError if ``path`` does not exist and VectorFileError, naming the file and
    the field, tensor or value at fault, for anything else wrong with it. Warns
    (VectorFileWarning) when ``controlvector.layer_count`` differs from the number of tensors
    (llama.cpp ignores that field), when ``controlvector.model_hint`` is missing, and when the
    file's ggsteer.version is newer than this code's.
    The returned arrays are copies; the file is closed and unmapped on return.
    """
    if isinstance(layer_offset, bool) or not isinstance(layer_offset, int):
        raise TypeError(f"layer_offset must be an int, got {show(layer_offset)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "control vector file not found", path)
    architecture = scan_gguf_layout(path)
    if architecture != ARCHITECTURE:
        raise VectorFileError(
            f"{path}: general.architecture is {architecture!r}, expected {ARCHITECTURE!r} "
            "(is this a model file rather than a control vector?)"
        )
    raw = _load_with_gguf_reader(path)
    file_directions = _directions_in_file_order(path, raw.tensors)
    _warn_on_layer_count(path, raw.fields, len(file_directions))
    metadata = _ggsteer_metadata(path, raw.fields, [layer for layer, _ in file_directions], len(file_directions[0][1]))
    directions = _apply_layer_offset(path, raw.tensors, file_directions, layer_offset)
    return VectorFile(
        directions=dict(sorted(directions.items())),
        model_hint=_model_hint(path, raw.fields),
        metadata=_shift_metadata_layers(metadata, layer_offset),
        source="ggsteer" if metadata else "external",
    )


class _RawField(NamedTuple):
    types: tuple[GGUFValueType, ...]
    value: object


class _RawTensor(NamedTuple):
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    values: np.ndarray | None  # a float32 copy, only for F32 tensors


class _RawFile(NamedTuple):
    fields: dict[str, _RawField]
    tensors: list[_RawTensor]


# What gguf's reader raises on malformed input besides the checks scan_gguf_layout already did.
_GGUF_READER_ERRORS = (
    ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error, MemoryError, RecursionError, OSError,
)


def _load_with_gguf_reader(path: str) -> _RawFile:
    try:
        return _copy_out_of_reader(path)
    except FileNotFoundError:
        raise
    except _GGUF_READER_ERRORS as error:
        problem = f"{type(error).__name__}: {error}"
    # Raised outside the except block so no traceback keeps the reader (and its mmap) alive.
    raise VectorFileError(f"{path}: malformed GGUF file ({problem})")


def _copy_out_of_reader(path: str) -> _RawFile:
    reader = gguf.GGUFReader(path, "r")
    fields = {
        name: _RawField(tuple(item.types), item.contents())
        for name, item in reader.fields.items()
        if not name.startswith("GGUF.")  # the reader's pseudo-fields for the header
    }
    tensors = [_copy_tensor(tensor) for tensor in reader.tensors]
    return _RawFile(fields, tensors)  # the reader and its mmap die with this frame


def _copy_tensor(tensor: Any) -> _RawTensor:
    is_f32 = tensor.tensor_type == GGMLQuantizationType.F32
    values = np.array(tensor.data.reshape(-1), dtype=np.float32) if is_f32 else None  # a copy, not a view
    shape = tuple(int(size) for size in tensor.shape)
    return _RawTensor(tensor.name, GGMLQuantizationType(tensor.tensor_type), shape, values)


def _directions_in_file_order(path: str, tensors: list[_RawTensor]) -> list[tuple[int, np.ndarray]]:
    if not tensors:
        raise VectorFileError(f"{path}: the file has no direction tensors")
    result: list[tuple[int, np.ndarray]] = []
    names_by_layer: dict[int, str] = {}
    for tensor in tensors:
        layer = _layer_from_tensor_name(path, tensor.name)
        values = _direction_values(path, tensor)
        if result and len(values) != len(result[0][1]):
            raise VectorFileError(
                f"{path}: tensor {tensor.name!r} has length {len(values)} but {tensors[0].name!r} has "
                f"{len(result[0][1])}; all directions must have the same length (n_embd)"
            )
        if layer in names_by_layer:
            first = names_by_layer[layer]
            raise VectorFileError(f"{path}: tensors {first!r} and {tensor.name!r} are both for layer {layer}")
        names_by_layer[layer] = tensor.name
        result.append((layer, values))
    return result


def _layer_from_tensor_name(path: str, name: str) -> int:
    match = DIRECTION_NAME.fullmatch(name)
    if match is None:
        raise VectorFileError(f"{path}: tensor {name!r} is not named direction.<layer>; llama.cpp rejects such files")
    layer = int(match.group(1))
    if layer < 1:
        raise VectorFileError(
            f"{path}: tensor {name!r} is for layer {layer}; layers in a file start at 1 "
            "(llama.cpp cannot apply block 0 and rejects such files)"
        )
    return layer


def _direction_values(path: str, tensor: _RawTensor) -> np.ndarray:
    if tensor.values is None:
        raise VectorFileError(
            f"{path}: tensor {tensor.name!r} has type {tensor.ggml_type.name}; llama.cpp only loads F32 directions"
        )
    # ggml_n_dims ignores trailing dimensions of size 1, and so does llama.cpp's loader
    if any(size != 1 for size in tensor.shape[1:]) or tensor.values.size == 0:
        raise VectorFileError(
            f"{path}: tensor {tensor.name!r} has shape {list(tensor.shape)}; a direction must be a non-empty 1-D tensor"
        )
    check_finite(tensor.values, f"{path}: tensor {tensor.name!r}")
    return tensor.values


def _apply_layer_offset(
    path: str, tensors: list[_RawTensor], file_directions: list[tuple[int, np.ndarray]], layer_offset: int
) -> dict[int, np.ndarray]:
    directions = {}
    for tensor, (layer, values) in zip(tensors, file_directions, strict=True):
        if layer + layer_offset < 0:
            raise VectorFileError(
                f"{path}: tensor {tensor.name!r} with layer_offset={layer_offset} gives layer {layer + layer_offset}"
                " < 0"
            )
        directions[layer + layer_offset] = values
    return directions


def _warn_on_layer_count(path: str, fields: dict[str, _RawField], n_tensors: int) -> None:
    raw = fields.get(LAYER_COUNT_KEY)
    if raw is None:
        return  # llama.cpp never reads it, so a missing count is no problem
    count_is_integer = len(raw.types) == 1 and raw.types[0] in INTEGER_GGUF_TYPES
    if not count_is_integer or raw.value != n_tensors:
        warnings.warn(
            f"{path}: {LAYER_COUNT_KEY} is {raw.value!r} but the file has {n_tensors} direction tensors "
            "(llama.cpp ignores this field; using the tensors)",
            VectorFileWarning,
            stacklevel=3,
        )


def _model_hint(path: str, fields: dict[str, _RawField]) -> str:
    raw = fields.get(MODEL_HINT_KEY)
    if raw is None:
        warnings.warn(f"{path}: {MODEL_HINT_KEY} is missing; model hint is ''", VectorFileWarning, stacklevel=3)
        return ""
    if raw.types != (GGUFValueType.STRING,):
        raise VectorFileError(f"{path}: {MODEL_HINT_KEY} must be a string, got {_type_names(raw.types)}")
    return raw.value  # type: ignore[return-value]


def _type_names(types: tuple[GGUFValueType, ...]) -> str:
    return " of ".join(value_type.name for value_type in types) or "nothing"


def _ggsteer_metadata(
    path: str, fields: dict[str, _RawField], file_layers: list[int], n_embd: int
) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for name, raw in fields.items():
        if not name.startswith(GGSTEER_PREFIX):
            continue
        key = name[len(GGSTEER_PREFIX):]
        # Keys from a newer ggsteer are kept as they are, so nothing in the file is hidden.
        metadata[key] = _metadata_from_field(path, key, raw) if key in METADATA_KEYS else raw.value
    if not metadata:
        return metadata
    check_metadata_consistency(metadata, file_layers, n_embd, path)
    version = metadata.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        warnings.warn(
            f"{path}: ggsteer.version is {version}, newer than this ggsteer's {FORMAT_VERSION}; "
            "reading the keys it knows",
            VectorFileWarning,
            stacklevel=3,
        )
    return metadata


def _metadata_from_field(path: str, key: str, raw: _RawField) -> object:
    spec = METADATA_KEYS[key]
    if not _gguf_type_matches(spec, raw.types):
        stored = _type_names(raw.types)
        raise VectorFileError(f"{path}: ggsteer.{key} must be {spec.description}, but the file stores {stored}")
    return normalize_metadata_value(key, raw.value, path)


def _gguf_type_matches(spec: MetadataSpec, types: tuple[GGUFValueType, ...]) -> bool:
    expected_shape = (GGUFValueType.ARRAY,) if spec.is_array else ()
    if types[: len(expected_shape)] != expected_shape or len(types) != len(expected_shape) + 1:
        return False
    element = types[-1]
    if spec.gguf_type == GGUFValueType.STRING:
        return element == GGUFValueType.STRING
    if spec.gguf_type == GGUFValueType.FLOAT32:
        return element in FLOAT_GGUF_TYPES
    return element in INTEGER_GGUF_TYPES  # ranges are checked on the values


def _shift_metadata_layers(metadata: dict[str, object], layer_offset: int) -> dict[str, object]:
    shifted = dict(metadata)
    for key in LAYER_LIST_KEYS:
        if layer_offset and isinstance(shifted.get(key), list):
            shifted[key] = [layer + layer_offset for layer in shifted[key]]  # type: ignore[union-attr]
    return shifted
