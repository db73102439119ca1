"""Writing control-vector GGUF files that llama.cpp loads (atomically, never clobbering)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf.constants import GGUFValueType

from ggsteer.atomic_file import check_destination, write_atomically
from ggsteer.vectors.file.format import (
    ARCHITECTURE,
    FORMAT_VERSION,
    GGSTEER_PREFIX,
    INT32_MAX,
    LAYER_COUNT_KEY,
    MODEL_HINT_KEY,
    VectorFileError,
)
from ggsteer.vectors.file.schema import (
    METADATA_KEYS,
    PER_LAYER_KEYS,
    PER_LAYER_VECTOR_KEYS,
    MetadataSpec,
    check_metadata_consistency,
    is_flat_sequence,
    normalize_metadata_value,
    show,
)

# ---------------------------------------------------------------------------------------------
# Writing

CONTROL_VECTOR_FILE = "control vector file"


def write_vector_file(
    path: str | os.PathLike[str],
    directions: Mapping[int, Any],
    *,
    model_hint: str,
    metadata: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a control-vector GGUF file that llama.cpp's ``--control-vector`` loads.

    directions: layer (>= 1; layer i = output of block i) -> 1-D array of n_embd finite numbers,
        stored as float32 tensors ``direction.<layer>`` in ascending layer order.
    model_hint: the model's architecture name (``general.architecture`` of the model).
    metadata: ggsteer keys without prefix. Keys in METADATA_KEYS are type-checked and stored with
        their GGUF type; "version", "n_embd" and "layers" are filled in and, if given, must agree
        (``layers`` may list the directions' layers in any order). Per-layer keys take a sequence
        aligned to ``metadata["layers"]`` (or to the sorted layers without it) or a dict
        layer -> value; the file stores them in ascending layer order. Other keys (names of
        letters, digits, '_' and '.') take a str, bool, int, finite float or a non-empty list of
        one kind, stored as STRING, BOOL, INT64, FLOAT64 so they read back exactly.
    overwrite: replace an existing file; otherwise FileExistsError and the file is left alone.

    The file is written to a temporary file next to ``path`` and renamed over it, so ``path``
    never holds a partial file and no temporary file is left behind on failure.
    """
    path = os.fspath(path)
    check_destination(path, overwrite=overwrite, what=CONTROL_VECTOR_FILE)
    where = f"cannot write {path}"
    layers, vectors = _validated_directions(directions, where)
    _check_model_hint(model_hint, where)
    fields = _metadata_for_writing(metadata, layers, len(vectors[0]), where)
    write_atomically(path, lambda temp: _write_gguf(temp, layers, vectors, model_hint, fields),
                     overwrite=overwrite, what=CONTROL_VECTOR_FILE)


def _validated_directions(directions: Mapping[int, Any], where: str) -> tuple[list[int], list[np.ndarray]]:
    if not isinstance(directions, Mapping) or len(directions) == 0:
        raise VectorFileError(f"{where}: directions must be a non-empty dict of layer -> vector")
    by_layer = {_checked_layer_for_writing(layer, where): vector for layer, vector in directions.items()}
    layers = sorted(by_layer)
    vectors = [_validated_vector(layer, by_layer[layer], where) for layer in layers]
    _check_equal_lengths(layers, vectors, where)
    return layers, vectors


def _checked_layer_for_writing(layer: object, where: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise VectorFileError(f"{where}: layer keys must be ints, got {show(layer)}")
    layer = int(layer)
    if layer == 0:
        raise VectorFileError(
            f"{where}: layer 0 (the output of block 0) cannot be stored: llama.cpp applies "
            "direction.N to block N and its loader rejects direction.0; drop layer 0 before writing"
        )
    if not 1 <= layer <= INT32_MAX:
        raise VectorFileError(f"{where}: layer {layer} is not a valid layer (must be 1 .. {INT32_MAX})")
    return layer


def _validated_vector(layer: int, vector: Any, where: str) -> np.ndarray:
    try:
        array = np.asarray(vector)
    except (ValueError, TypeError) as error:  # e.g. a ragged nested list
        raise VectorFileError(f"{where}: layer {layer}: direction is not an array of numbers ({error})") from None
    if array.dtype.kind not in "fiu":
        raise VectorFileError(f"{where}: layer {layer}: direction must hold real numbers, got dtype {array.dtype}")
    if array.ndim != 1 or array.size == 0:
        raise VectorFileError(f"{where}: layer {layer}: direction must be a non-empty 1-D array, got {array.shape}")
    with np.errstate(over="ignore"):
        as_float32 = np.ascontiguousarray(array, dtype=np.float32)  # llama.cpp only loads F32
    check_finite(as_float32, f"{where}: layer {layer}")
    return as_float32


def check_finite(vector: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(vector)
    if bad.any():
        index = int(np.argmax(bad))
        raise VectorFileError(
            f"{what}: direction has {int(bad.sum())} non-finite values (first at index {index}: {vector[index]})"
        )


def _check_equal_lengths(layers: list[int], vectors: list[np.ndarray], where: str) -> None:
    for layer, vector in zip(layers, vectors, strict=True):
        if len(vector) != len(vectors[0]):
            raise VectorFileError(
                f"{where}: layer {layer} has length {len(vector)} but layer {layers[0]} has {len(vectors[0])}; "
                "llama.cpp needs every direction to have the same length (n_embd)"
            )


def _check_model_hint(model_hint: object, where: str) -> None:
    if not isinstance(model_hint, str) or not model_hint:
        raise VectorFileError(
            f"{where}: model_hint must be a non-empty str (the model's architecture), got {show(model_hint)}"
        )


class _EncodedField(NamedTuple):
    key: str  # without the "ggsteer." prefix
    value: object
    gguf_type: GGUFValueType
    item_type: GGUFValueType | None  # for arrays


def _metadata_for_writing(
    metadata: Mapping[str, object] | None, layers: list[int], n_embd: int, where: str
) -> list[_EncodedField]:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise VectorFileError(f"{where}: metadata must be a dict of ggsteer keys, got {show(metadata)}")
    given = dict(metadata or {})
    if "version" in given and normalize_metadata_value("version", given["version"], where) != FORMAT_VERSION:
        raise VectorFileError(f"{where}: ggsteer.version is written as {FORMAT_VERSION}, got {show(given['version'])}")
    given = _per_layer_values_in_file_order(given, layers, where)
    complete = {"version": FORMAT_VERSION, "n_embd": n_embd, **given, "layers": layers}
    known = {key: normalize_metadata_value(key, complete[key], where) for key in METADATA_KEYS if key in complete}
    check_metadata_consistency(known, layers, n_embd, where)
    encoded = [_EncodedField(key, value, *_spec_gguf_types(METADATA_KEYS[key])) for key, value in known.items()]
    extra = [_encode_extra_value(key, value, where) for key, value in complete.items() if key not in METADATA_KEYS]
    return encoded + extra


def _per_layer_values_in_file_order(given: dict[str, object], layers: list[int], where: str) -> dict[str, object]:
    """Per-layer values follow the caller's ggsteer.layers (else the sorted layers); files hold them sorted."""
    caller_order = layers
    if "layers" in given:
        caller_order = normalize_metadata_value("layers", given["layers"], where)  # type: ignore[assignment]
        if sorted(caller_order) != layers:  # also catches a layer listed twice
            raise VectorFileError(f"{where}: ggsteer.layers is {caller_order}; the directions are for layers {layers}")
    position = {layer: index for index, layer in enumerate(caller_order)}
    result = dict(given)
    for key in PER_LAYER_KEYS:
        values = given.get(key)
        if isinstance(values, Mapping):
            result[key] = _align_to_layers(key, values, layers, where)
        elif is_flat_sequence(values) and len(values) == len(layers):  # type: ignore[arg-type]
            result[key] = [values[position[layer]] for layer in layers]  # type: ignore[index]
    for key in PER_LAYER_VECTOR_KEYS:
        values = given.get(key)
        if is_flat_sequence(values) and len(values) % max(1, len(layers)) == 0:  # type: ignore[arg-type]
            width = len(values) // max(1, len(layers))  # type: ignore[arg-type]
            result[key] = [x for layer in layers
                           for x in values[position[layer] * width : (position[layer] + 1) * width]]  # type: ignore[index]
    return result


def _align_to_layers(key: str, values: Mapping[Any, object], layers: list[int], where: str) -> list[object]:
    if set(values) != set(layers):
        given = sorted(values, key=repr)
        raise VectorFileError(f"{where}: ggsteer.{key} has values for layers {given}; the directions are for {layers}")
    return [values[layer] for layer in layers]


def _spec_gguf_types(spec: MetadataSpec) -> tuple[GGUFValueType, GGUFValueType | None]:
    return (GGUFValueType.ARRAY, spec.gguf_type) if spec.is_array else (spec.gguf_type, None)


_EXTRA_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_EXTRA_VALUE_RULES = "a str, bool, int64, finite float, or a non-empty list of one of those"


def _encode_extra_value(key: object, value: object, where: str) -> _EncodedField:
    """Keys outside METADATA_KEYS: stored with lossless GGUF types (int64, float64) so they round-trip."""
    if not isinstance(key, str) or not _EXTRA_KEY.fullmatch(key):
        raise VectorFileError(f"{where}: metadata key {key!r} must be made of letters, digits, '_' and '.'")
    if key.startswith(GGSTEER_PREFIX):
        raise VectorFileError(f"{where}: metadata key {key!r}: give keys without the {GGSTEER_PREFIX!r} prefix")
    if is_flat_sequence(value) and len(value) > 0:  # type: ignore[arg-type]
        items = [_encode_extra_scalar(item) for item in value]  # type: ignore[union-attr]
        item_types = {encoded[1] for encoded in items if encoded is not None}
        if None not in items and len(item_types) == 1:
            return _EncodedField(key, [encoded[0] for encoded in items], GGUFValueType.ARRAY, item_types.pop())
        if None not in items and item_types == {GGUFValueType.INT64, GGUFValueType.FLOAT64}:  # ints among floats
            floats = [float(encoded[0]) for encoded in items]  # type: ignore[arg-type,index]
            return _EncodedField(key, floats, GGUFValueType.ARRAY, GGUFValueType.FLOAT64)
    elif (encoded := _encode_extra_scalar(value)) is not None:
        return _EncodedField(key, encoded[0], encoded[1], None)
    raise VectorFileError(f"{where}: ggsteer.{key} must be {_EXTRA_VALUE_RULES}, got {show(value)}")


def _encode_extra_scalar(value: object) -> tuple[object, GGUFValueType] | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value), GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        number = int(value)
        return (number, GGUFValueType.INT64) if -(2**63) <= number < 2**63 else None
    if isinstance(value, (float, np.floating)):
        return (float(value), GGUFValueType.FLOAT64) if math.isfinite(value) else None
    if isinstance(value, str):
        return value, GGUFValueType.STRING
    return None


def _write_gguf(
    temp: str, layers: list[int], vectors: list[np.ndarray], model_hint: str, fields: list[_EncodedField]
) -> None:
    writer = gguf.GGUFWriter(temp, ARCHITECTURE)  # writes general.architecture first
    try:
        writer.add_string(MODEL_HINT_KEY, model_hint)
        writer.add_uint32(LAYER_COUNT_KEY, len(layers))
        for item in fields:
            writer.add_key_value(GGSTEER_PREFIX + item.key, item.value, item.gguf_type, sub_type=item.item_type)
        for layer, vector in zip(layers, vectors, strict=True):
            writer.add_tensor(f"direction.{layer}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
