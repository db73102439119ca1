"""The ggsteer metadata keys of a control-vector file: their types and how they are checked."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf.constants import GGUFValueType

from ggsteer.vectors.file.format import INT32_MAX, VectorFileError

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
    # per layer, n_embd values each: the unit direction ablate and clamp act on (vectors/projection.py)
    "ablation_direction": _FLOAT32_LIST,
    "ablation_center": _FLOAT32_LIST,  # per layer: mean projection of the pair midpoints on ablation_direction
    "ablation_gap": _FLOAT32_LIST,  # per layer: mean gap along ablation_direction (clamp's strength unit)
    "stability": _FLOAT32_LIST,  # per layer: expected |cos| of the direction with unlimited pairs' (split half)
    "consistency": _FLOAT32_LIST,  # per layer: mean cosine between pair differences (steerability predictor)
    "pairs_used": _UINT32,  # pairs the directions were fitted on (training in rounds stops early)
    "dataset_size": _UINT32,  # number of contrast pairs
    "dataset_hash": _STR,  # hash of the contrast dataset
    "recommended_strength": _FLOAT32,
    "recommended_layers": _INT32_LIST,
    # Also used by ggsteer.vectors.control_vector:
    "unit": _STR,  # what strength 1 means: "gap" (one mean gap per layer) or "raw"
    "pool": _STR,  # how token states were pooled during training, e.g. "last", "mean"
    "n_layer": _UINT32,  # number of blocks of the model the vector was made for
}
# The settings `ggsteer tune` chose (evaluate/tune.py); consumers prefer them to the recommended ones.
TUNED_KEYS: dict[str, MetadataSpec] = {
    "tuned_op": _STR,  # "add", "add_normalized" or "clamp"
    "tuned_when": _STR,  # "all" or "generated"
    "tuned_layers": _INT32_LIST,
    "tuned_strength": _FLOAT32,  # in the op's strength unit (clamp: the target, in gaps past neutral)
    "tuned_max_kl": _FLOAT32,  # the KL budget the search ran under
    "tuned_kl": _FLOAT32,  # the chosen settings' KL on neutral text
    "tuned_gain": _FLOAT32,  # their behaviour move on the report prompts (not searched on), nats
}
METADATA_KEYS.update(TUNED_KEYS)
TUNED_OPS = ("add", "add_normalized", "clamp")
TUNED_WHEN = ("all", "prompt", "generated")
PER_LAYER_KEYS = ("separation", "gap", "residual_norm", "center", "ablation_center", "ablation_gap", "stability",
                  "consistency")
# per-layer keys holding one n_embd vector per layer, concatenated in layer order
PER_LAYER_VECTOR_KEYS = ("ablation_direction",)
LAYER_LIST_KEYS = ("layers", "recommended_layers", "tuned_layers")

INTEGER_GGUF_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}
FLOAT_GGUF_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}


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
        return _normalize_int(value, -(2**31), INT32_MAX)
    return _normalize_float32(value)


def normalize_metadata_value(key: str, value: object, where: str) -> object:
    """Check one metadata value against METADATA_KEYS and return its plain Python form."""
    spec = METADATA_KEYS[key]
    if not spec.is_array:
        normalized = _normalize_scalar(spec, value)
    elif is_flat_sequence(value) and len(value) > 0:  # type: ignore[arg-type]
        items = [_normalize_scalar(spec, item) for item in value]  # type: ignore[union-attr]
        normalized = None if any(item is None for item in items) else items
    else:
        normalized = None
    if normalized is None:
        raise VectorFileError(f"{where}: ggsteer.{key} must be {spec.description}, got {show(value)}")
    return normalized


def is_flat_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


def show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def check_metadata_consistency(meta: dict[str, object], layers: list[int], n_embd: int, where: str) -> None:
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
    for key in ("recommended_layers", "tuned_layers"):
        unknown = sorted(set(meta.get(key, [])) - set(layers))  # type: ignore[arg-type]
        if unknown:
            raise VectorFileError(f"{where}: ggsteer.{key} has layers {unknown} that have no direction "
                                  f"(layers: {layers})")
    _check_tuned(meta, where)


def _check_tuned(meta: dict[str, object], where: str) -> None:
    """The tuned settings come as a whole (op, when, layers, strength), with an op and gating ggsteer knows."""
    needed = ("tuned_op", "tuned_when", "tuned_layers", "tuned_strength")
    present = [key for key in needed if key in meta]
    if present and len(present) != len(needed):
        missing = [key for key in needed if key not in meta]
        raise VectorFileError(f"{where}: the tuned settings are incomplete: {', '.join(missing)} missing")
    if meta.get("tuned_op", "add") not in TUNED_OPS:
        raise VectorFileError(f"{where}: ggsteer.tuned_op is {meta['tuned_op']!r}: "
                              f"expected one of {', '.join(TUNED_OPS)}")
    if meta.get("tuned_when", "all") not in TUNED_WHEN:
        raise VectorFileError(
            f"{where}: ggsteer.tuned_when is {meta['tuned_when']!r}: expected one of {', '.join(TUNED_WHEN)}"
        )
