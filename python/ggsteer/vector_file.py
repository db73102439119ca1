"""Control-vector files: GGUF files that llama.cpp loads with ``--control-vector``.

Layer convention
----------------
ggsteer's layer ``i`` is the output of transformer block ``i`` (0-based), the tensor llama.cpp
names ``l_out-i`` in its graph. In a file, tensor ``direction.N`` is what llama.cpp adds to
``l_out-N``, so by default ``read_vector_file`` returns it as layer ``N``. This was checked in
llama.cpp's sources:

* ``common/common.cpp``, ``common_control_vector_load_one``: ``direction.N`` is summed into a flat
  buffer at offset ``n_embd * (N - 1)``; ``common_control_vector_load`` adds files together.
* ``src/llama-adapter.cpp``, ``llama_adapter_cvec::apply``: for ``il`` in ``1 .. n_layer - 1``,
  ``tensors[il]`` is filled from offset ``n_embd * (il - 1)``; ``init`` never makes a tensor for
  block 0, and directions with ``N >= n_layer`` are silently ignored.
* ``src/models/*.cpp``: ``cur = build_cvec(cur, il); cb(cur, "l_out", il);`` adds
  ``tensors[il]`` to the output of block ``il``. Chaining the three: ``direction.N -> l_out-N``.

Block 0 cannot be addressed by a file, so ``write_vector_file`` refuses layer 0.

Where files come from
---------------------
* repeng's ``ControlVector.export_gguf`` writes ``direction.<layer>`` with repeng's layer ids,
  which are block indices too (``batched_get_hiddens`` reads ``hidden_states[layer + 1]``, the
  output of block ``layer``), so its files load with the default ``layer_offset=0``.
* llama.cpp's ``tools/cvector-generator/cvector-generator.cpp`` captures every ``l_out-*`` tensor
  in graph order from ``cb_eval``. The last block's ``l_out`` only holds the output rows, so it
  fails the ``ne[1] == n_tokens`` filter; the ``n_layer - 1`` captured vectors are therefore
  ``l_out-0 .. l_out-(n_layer-2)``. ``pca.hpp`` / ``mean.hpp`` name vector ``il`` (measured at
  ``l_out-il``) ``direction.(il + 1)`` and ``export_gguf`` writes ``controlvector.layer_count`` as an
  int32. llama.cpp thus applies each of its directions one block later than where it was
  measured. Files load with llama.cpp's application semantics (layer ``N``) by default;
  ``read_vector_file(path, layer_offset=-1)`` moves them back to where they were measured.

File format
-----------
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (str),
``controlvector.layer_count`` (uint32) and one F32 1-D tensor ``direction.<N>`` per layer, written
in ascending layer order. llama.cpp reads only the tensors: its loader rejects a whole file when a
tensor name is not ``direction.<N>`` with ``N >= 1``, a tensor is not F32, not 1-D (by
``ggml_n_dims``, so trailing dimensions of 1 are allowed) or differs in length from the first.
ggsteer adds its own keys under ``ggsteer.`` (llama.cpp ignores unknown keys); see ``METADATA_KEYS``.

Decisions
---------
* Reading is stricter than llama.cpp where llama.cpp is lenient: ``general.architecture`` must
  be ``controlvector``; tensor names must be exactly ``direction.<integer>`` (llama.cpp's
  ``std::stoi`` would also take ``direction.1abc``); two tensors for one layer (e.g.
  ``direction.01`` and ``direction.1``, which llama.cpp would add) are refused; NaN/Inf and empty
  directions are refused.
* ``controlvector.layer_count`` is not used by llama.cpp, so a value that differs from the number of
  tensors only warns (``VectorFileWarning``); a missing ``controlvector.model_hint`` warns and reads
  as ``""``.
* A ``layer_offset`` that moves a direction to layer 0 is allowed in memory (ggsteer's own hooks can
  steer block 0) but such a file cannot be written back; a result below 0 is an error.
* ``gguf.GGUFReader`` trusts the length fields: an array length larger than the file makes it read
  empty slices past the end forever (a corrupted file hangs it and grows memory without bound),
  and a slightly too large one makes it return empty items silently. Before handing a file to it,
  ``_scan_gguf_layout`` walks the header with every count and length checked against the bytes
  actually left, and also applies the structural rules of ggml's C parser (``ggml/src/gguf.cpp``,
  which llama.cpp's loader uses): no nested arrays, no empty keys, tensor names under 64 bytes,
  at most 4 dimensions, tensor data back to back at the alignment and inside the file.
  Big-endian files are refused (llama.cpp cannot load them either).
* Metadata is a plain dict. Keys in ``METADATA_KEYS`` are type-checked on writing and reading and
  stored with fixed GGUF types; their floats are float32, so they read back as the float32 values
  (as Python floats). Other keys are accepted for forward compatibility (and kept when reading)
  with lossless types (INT64, FLOAT64, STRING, BOOL, arrays of one of them). Files hold the layers
  in ascending order; per-layer values given in another order (``metadata["layers"]``) are reordered.
* ``write_vector_file`` checks ``overwrite=False`` before writing and again just before
  ``os.replace``; a file created in between these two moments by another process would still be
  replaced (``os.replace`` has no "fail if exists" mode).
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import re
import secrets
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEYS",
    "MetadataSpec",
    "PER_LAYER_KEYS",
    "VectorFile",
    "VectorFileError",
    "VectorFileWarning",
    "describe_vector_file",
    "read_vector_file",
    "write_vector_file",
]

ARCHITECTURE = "controlvector"
MODEL_HINT_KEY = "controlvector.model_hint"
LAYER_COUNT_KEY = "controlvector.layer_count"
GGSTEER_PREFIX = "ggsteer."
FORMAT_VERSION = 1

_DIRECTION_NAME = re.compile(r"direction\.(-?[0-9]+)")
_INT32_MAX = 2**31 - 1


class VectorFileError(ValueError):
    """A control-vector file (or the data given to write one) is invalid."""


class VectorFileWarning(UserWarning):
    """Something in a control-vector file is odd but llama.cpp would still load it."""


@dataclass(eq=False)  # eq=False: comparing dicts of numpy arrays with == is ambiguous
class VectorFile:
    """A control vector as read from a file.

    directions: layer -> float32 [n_embd] (layer i = output of block i), sorted by layer.
    model_hint: the model architecture the vector was made for, e.g. "llama", "gemma3".
    metadata: the ggsteer keys without their "ggsteer." prefix (see METADATA_KEYS).
    source: "ggsteer" if the file has ggsteer keys, else "external".
    """

    directions: dict[int, np.ndarray]
    model_hint: str
    metadata: dict[str, object] = field(default_factory=dict)
    source: str = "external"

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def n_embd(self) -> int:
        return len(next(iter(self.directions.values())))

    def per_layer(self, key: str) -> dict[int, float]:
        """A per-layer metadata array ("separation", "gap", "residual_norm") as layer -> value."""
        values = self.metadata.get(key)
        if values is None:
            return {}
        layers = self.metadata.get("layers", list(self.directions))
        return dict(zip(layers, values, strict=True))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Metadata schema


class MetadataSpec(NamedTuple):
    """How one ggsteer metadata value is typed in Python and stored in GGUF."""

    description: str
    gguf_type: GGUFValueType  # the element type for arrays
    is_array: bool


_STR = MetadataSpec("a str", GGUFValueType.STRING, False)
_UINT32 = MetadataSpec("a uint32 (int in 0 .. 2**32-1)", GGUFValueType.UINT32, False)
_FLOAT32 = MetadataSpec("a finite float32", GGUFValueType.FLOAT32, False)
_INT32_LIST = MetadataSpec("a non-empty list of int32", GGUFValueType.INT32, True)
_FLOAT32_LIST = MetadataSpec("a non-empty list of finite float32", GGUFValueType.FLOAT32, True)

METADATA_KEYS: dict[str, MetadataSpec] = {
    "version": _UINT32,  # ggsteer's metadata format version; written automatically
    "method": _STR,  # how the directions were computed, e.g. "pca_diff", "mean_diff"
    "model_name": _STR,  # the model file or name the vector was extracted from
    "n_embd": _UINT32,  # length of every direction; written automatically
    "layers": _INT32_LIST,  # the layers in file order; written automatically
    "separation": _FLOAT32_LIST,  # per layer: how well the direction separates the pairs
    "gap": _FLOAT32_LIST,  # per layer: mean gap of positive minus negative projections (strength unit)
    "residual_norm": _FLOAT32_LIST,  # per layer: typical norm of the residual stream there
    "center": _FLOAT32_LIST,  # per layer: mean projection of the pair midpoints (the neutral point)
    # per layer, n_embd values each: the unit direction ablate and clamp act on (ggsteer.projection)
    "ablation_direction": _FLOAT32_LIST,
    "ablation_center": _FLOAT32_LIST,  # per layer: mean projection of the pair midpoints on ablation_direction
    "ablation_gap": _FLOAT32_LIST,  # per layer: mean gap along ablation_direction (clamp's strength unit)
    "dataset_size": _UINT32,  # number of contrast pairs
    "dataset_hash": _STR,  # hash of the contrast dataset
    "recommended_strength": _FLOAT32,
    "recommended_layers": _INT32_LIST,
    # Also used by ggsteer.vector:
    "unit": _STR,  # what strength 1 means: "gap" (one mean gap per layer) or "raw"
    "pool": _STR,  # how token states were pooled during training, e.g. "last", "mean"
    "n_layer": _UINT32,  # number of blocks of the model the vector was made for
}
PER_LAYER_KEYS = ("separation", "gap", "residual_norm", "center", "ablation_center", "ablation_gap")
# per-layer keys holding one n_embd vector per layer, concatenated in layer order
PER_LAYER_VECTOR_KEYS = ("ablation_direction",)
_LAYER_LIST_KEYS = ("layers", "recommended_layers")

_INTEGER_GGUF_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
_FLOAT_GGUF_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


def _normalize_int(value: object, low: int, high: int) -> int | None:
    # bool is an int subclass, but True is never a meaningful count or layer
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    number = int(value)
    return number if low <= number <= high else None


def _normalize_float32(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        with np.errstate(over="ignore"):
            number = np.float32(value)  # stored as float32, so overflow to inf is caught here
    except OverflowError:  # an int too large for any float
        return None
    return float(number) if np.isfinite(number) else None


def _normalize_scalar(spec: MetadataSpec, value: object) -> object | None:
    if spec.gguf_type == GGUFValueType.STRING:
        return value if isinstance(value, str) else None
    if spec.gguf_type == GGUFValueType.UINT32:
        return _normalize_int(value, 0, 2**32 - 1)
    if spec.gguf_type == GGUFValueType.INT32:
        return _normalize_int(value, -(2**31), _INT32_MAX)
    return _normalize_float32(value)


def _normalize_metadata_value(key: str, value: object, where: str) -> object:
    """Check one metadata value against METADATA_KEYS and return its plain Python form."""
    spec = METADATA_KEYS[key]
    if not spec.is_array:
        normalized = _normalize_scalar(spec, value)
    elif _is_flat_sequence(value) and len(value) > 0:  # type: ignore[arg-type]
        items = [_normalize_scalar(spec, item) for item in value]  # type: ignore[union-attr]
        normalized = None if any(item is None for item in items) else items
    else:
        normalized = None
    if normalized is None:
        raise VectorFileError(f"{where}: ggsteer.{key} must be {spec.description}, got {_show(value)}")
    return normalized


def _is_flat_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def _check_metadata_consistency(meta: dict[str, object], layers: list[int], n_embd: int, where: str) -> None:
    """Check the metadata against the directions it describes (shared by reading and writing)."""
    if "layers" not in meta and any(key in meta for key in (*PER_LAYER_KEYS, *PER_LAYER_VECTOR_KEYS)):
        raise VectorFileError(f"{where}: per-layer ggsteer keys need ggsteer.layers to say which layers they are for")
    if "n_embd" in meta and meta["n_embd"] != n_embd:
        raise VectorFileError(f"{where}: ggsteer.n_embd is {meta['n_embd']} but the directions have length {n_embd}")
    if "layers" in meta and meta["layers"] != layers:
        raise VectorFileError(f"{where}: ggsteer.layers is {meta['layers']} but the directions are for layers {layers}")
    for key in PER_LAYER_KEYS:
        if key in meta and len(meta[key]) != len(layers):  # type: ignore[arg-type]
            raise VectorFileError(
                f"{where}: ggsteer.{key} has {len(meta[key])} values but there are {len(layers)} layers {layers}"  # type: ignore[arg-type]
            )
    for key in PER_LAYER_VECTOR_KEYS:
        if key in meta and len(meta[key]) != len(layers) * n_embd:  # type: ignore[arg-type]
            raise VectorFileError(
                f"{where}: ggsteer.{key} has {len(meta[key])} values but {len(layers)} layers of n_embd {n_embd} need "  # type: ignore[arg-type]
                f"{len(layers) * n_embd}"
            )
    if "n_layer" in meta and max(layers) >= meta["n_layer"]:  # type: ignore[operator]
        raise VectorFileError(f"{where}: ggsteer.n_layer is {meta['n_layer']} but layer {max(layers)} has a direction")
    unknown = sorted(set(meta.get("recommended_layers", [])) - set(layers))  # type: ignore[arg-type]
    if unknown:
        raise VectorFileError(
            f"{where}: ggsteer.recommended_layers has layers {unknown} that have no direction (layers: {layers})"
        )


# ---------------------------------------------------------------------------------------------
# Writing


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
    if not overwrite and os.path.lexists(path):
        raise _file_exists(path)
    where = f"cannot write {path}"
    layers, vectors = _validated_directions(directions, where)
    _check_model_hint(model_hint, where)
    fields = _metadata_for_writing(metadata, layers, len(vectors[0]), where)
    _replace_atomically(path, overwrite, lambda temp: _write_gguf(temp, layers, vectors, model_hint, fields))


def _file_exists(path: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "control vector file exists (pass overwrite=True to replace it)", path)


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
        raise VectorFileError(f"{where}: layer keys must be ints, got {_show(layer)}")
    layer = int(layer)
    if layer == 0:
        raise VectorFileError(
            f"{where}: layer 0 (the output of block 0) cannot be stored: llama.cpp applies "
            "direction.N to block N and its loader rejects direction.0; drop layer 0 before writing"
        )
    if not 1 <= layer <= _INT32_MAX:
        raise VectorFileError(f"{where}: layer {layer} is not a valid layer (must be 1 .. {_INT32_MAX})")
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
    _check_finite(as_float32, f"{where}: layer {layer}")
    return as_float32


def _check_finite(vector: np.ndarray, what: str) -> None:
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
            f"{where}: model_hint must be a non-empty str (the model's architecture), got {_show(model_hint)}"
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
        raise VectorFileError(f"{where}: metadata must be a dict of ggsteer keys, got {_show(metadata)}")
    given = dict(metadata or {})
    if "version" in given and _normalize_metadata_value("version", given["version"], where) != FORMAT_VERSION:
        raise VectorFileError(f"{where}: ggsteer.version is written as {FORMAT_VERSION}, got {_show(given['version'])}")
    given = _per_layer_values_in_file_order(given, layers, where)
    complete = {"version": FORMAT_VERSION, "n_embd": n_embd, **given, "layers": layers}
    known = {key: _normalize_metadata_value(key, complete[key], where) for key in METADATA_KEYS if key in complete}
    _check_metadata_consistency(known, layers, n_embd, where)
    encoded = [_EncodedField(key, value, *_spec_gguf_types(METADATA_KEYS[key])) for key, value in known.items()]
    extra = [_encode_extra_value(key, value, where) for key, value in complete.items() if key not in METADATA_KEYS]
    return encoded + extra


def _per_layer_values_in_file_order(given: dict[str, object], layers: list[int], where: str) -> dict[str, object]:
    """Per-layer values follow the caller's ggsteer.layers (else the sorted layers); files hold them sorted."""
    caller_order = layers
    if "layers" in given:
        caller_order = _normalize_metadata_value("layers", given["layers"], where)  # type: ignore[assignment]
        if sorted(caller_order) != layers:  # also catches a layer listed twice
            raise VectorFileError(f"{where}: ggsteer.layers is {caller_order}; the directions are for layers {layers}")
    position = {layer: index for index, layer in enumerate(caller_order)}
    result = dict(given)
    for key in PER_LAYER_KEYS:
        values = given.get(key)
        if isinstance(values, Mapping):
            result[key] = _align_to_layers(key, values, layers, where)
        elif _is_flat_sequence(values) and len(values) == len(layers):  # type: ignore[arg-type]
            result[key] = [values[position[layer]] for layer in layers]  # type: ignore[index]
    for key in PER_LAYER_VECTOR_KEYS:
        values = given.get(key)
        if _is_flat_sequence(values) and len(values) % max(1, len(layers)) == 0:  # type: ignore[arg-type]
            width = len(values) // max(1, len(layers))  # type: ignore[arg-type]
            result[key] = [x for layer in layers for x in values[position[layer] * width : (position[layer] + 1) * width]]  # type: ignore[index]
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
    if _is_flat_sequence(value) and len(value) > 0:  # type: ignore[arg-type]
        items = [_encode_extra_scalar(item) for item in value]  # type: ignore[union-attr]
        item_types = {encoded[1] for encoded in items if encoded is not None}
        if None not in items and len(item_types) == 1:
            return _EncodedField(key, [encoded[0] for encoded in items], GGUFValueType.ARRAY, item_types.pop())
        if None not in items and item_types == {GGUFValueType.INT64, GGUFValueType.FLOAT64}:  # ints among floats
            floats = [float(encoded[0]) for encoded in items]  # type: ignore[arg-type,index]
            return _EncodedField(key, floats, GGUFValueType.ARRAY, GGUFValueType.FLOAT64)
    elif (encoded := _encode_extra_scalar(value)) is not None:
        return _EncodedField(key, encoded[0], encoded[1], None)
    raise VectorFileError(f"{where}: ggsteer.{key} must be {_EXTRA_VALUE_RULES}, got {_show(value)}")


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


def _replace_atomically(path: str, overwrite: bool, write: Callable[[str], None]) -> None:
    temp = _create_temp_file(path)
    try:
        write(temp)
        _flush_to_disk(temp)
        if not overwrite and os.path.lexists(path):  # it may have appeared while we were writing
            raise _file_exists(path)
        os.replace(temp, path)
    except BaseException:
        _remove_if_present(temp)
        raise


def _create_temp_file(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never clobber another writer's file; mode 0o666 lets the umask decide as for open()
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    os.close(descriptor)
    return temp


def _flush_to_disk(path: str) -> None:
    # Without fsync a crash right after os.replace can leave an empty file under the final name.
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _remove_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


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
        raise TypeError(f"layer_offset must be an int, got {_show(layer_offset)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "control vector file not found", path)
    architecture = _scan_gguf_layout(path)
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


# What gguf's reader raises on malformed input besides the checks _scan_gguf_layout already did.
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
    match = _DIRECTION_NAME.fullmatch(name)
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
    _check_finite(tensor.values, f"{path}: tensor {tensor.name!r}")
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
    count_is_integer = len(raw.types) == 1 and raw.types[0] in _INTEGER_GGUF_TYPES
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
    _check_metadata_consistency(metadata, file_layers, n_embd, path)
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
    return _normalize_metadata_value(key, raw.value, path)


def _gguf_type_matches(spec: MetadataSpec, types: tuple[GGUFValueType, ...]) -> bool:
    expected_shape = (GGUFValueType.ARRAY,) if spec.is_array else ()
    if types[: len(expected_shape)] != expected_shape or len(types) != len(expected_shape) + 1:
        return False
    element = types[-1]
    if spec.gguf_type == GGUFValueType.STRING:
        return element == GGUFValueType.STRING
    if spec.gguf_type == GGUFValueType.FLOAT32:
        return element in _FLOAT_GGUF_TYPES
    return element in _INTEGER_GGUF_TYPES  # ranges are checked on the values


def _shift_metadata_layers(metadata: dict[str, object], layer_offset: int) -> dict[str, object]:
    shifted = dict(metadata)
    for key in _LAYER_LIST_KEYS:
        if layer_offset and isinstance(shifted.get(key), list):
            shifted[key] = [layer + layer_offset for layer in shifted[key]]  # type: ignore[union-attr]
    return shifted


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


def _scan_gguf_layout(path: str) -> str | None:
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


# ---------------------------------------------------------------------------------------------
# Summary for `ggsteer inspect`


def describe_vector_file(vf: VectorFile) -> str:
    """A multi-line, human-readable summary of a control vector."""
    meta = vf.metadata
    lines = [
        f"model hint:  {vf.model_hint or '(none)'}",
        f"source:      {vf.source}" + (f" (format version {meta['version']})" if "version" in meta else ""),
        f"n_embd:      {vf.n_embd}",
        f"layers:      {len(vf.directions)} ({_format_layer_ranges(vf.layers)})",
    ]
    lines += _describe_scalars(meta)
    lines += _layer_table(vf)
    extra = sorted(key for key in meta if key not in METADATA_KEYS)
    lines += [f"other ggsteer.{key}: {_show(meta[key])}" for key in extra]
    return "\n".join(lines)


def _describe_scalars(meta: dict[str, object]) -> list[str]:
    lines = []
    if "method" in meta:
        lines.append(f"method:      {meta['method']}" + (f" (pool: {meta['pool']})" if "pool" in meta else ""))
    if "unit" in meta:
        lines.append(f"unit:        {meta['unit']}")
    if "model_name" in meta:
        blocks = f" ({meta['n_layer']} layers)" if "n_layer" in meta else ""
        lines.append(f"model name:  {meta['model_name']}{blocks}")
    if "dataset_size" in meta or "dataset_hash" in meta:
        lines.append(f"dataset:     {meta.get('dataset_size', '?')} pairs, hash {meta.get('dataset_hash', '?')}")
    if "recommended_strength" in meta:
        lines.append(f"recommended strength: {meta['recommended_strength']:g}")
    if "recommended_layers" in meta:
        lines.append(f"recommended layers:   {_format_layer_ranges(meta['recommended_layers'])}")  # type: ignore[arg-type]
    return lines


def _layer_table(vf: VectorFile) -> list[str]:
    # float64: the norm of a finite float32 vector can overflow float32
    norms = {layer: float(np.linalg.norm(vector.astype(np.float64))) for layer, vector in vf.directions.items()}
    columns = [("norm", norms)]
    columns += [(key.replace("_", " "), vf.per_layer(key)) for key in PER_LAYER_KEYS if key in vf.metadata]
    header = f"{'layer':>6}" + "".join(f"{title:>17}" for title, _ in columns)
    rows = [
        f"{layer:>6}" + "".join(f"{_format_number(values.get(layer)):>17}" for _, values in columns)
        for layer in vf.layers
    ]
    return ["", header, *rows]


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_layer_ranges(layers: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    ordered = sorted(layers)
    runs: list[list[int]] = []
    for layer in ordered:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
