"""Interventions addition cannot express, compiled into a program for the native hook.

Each operation acts on a block's output rows h (llama.cpp's `l_out-i`), per layer and per row:

- `add`: h += s * v (what llama.cpp's adapter does, but here per sequence or gated);
- `ablate`: the projection on a unit direction u set to the neutral point c: h += (c - h . u) u.
  For vectors trained by ggsteer, u is the trained direction without its components along the
  few directions every ordinary token shares, and c the mean projection of the training pairs'
  midpoints on it (vectors/projection.py says why: projecting along the raw direction flattens
  every token). Removing the whole projection would also remove the baseline every text has along
  u, which can push toward either side. Vectors without these statistics use u = v / |v| and
  c = their `center` or 0 (plain directional ablation h -= (h . u) u);
- `clamp`: the projection held at t = c + s * gap: s in strength units (the layer's trained gap
  along u), so `clamp 0` is `ablate` and `clamp 1` sits one gap past neutral;
- `add_normalized`: add, then rescale each row back to its norm before the addition.

Gating: `when="prompt"` (prompt tokens only), `"generated"` (generated tokens only), `first_k=k`
(positions < k only), `skip_first=k` (positions < k left alone: ablate and clamp leave the
attention sink, position 0, alone by default; 0 acts on every row). A `Condition` (CAST) decides per
sequence from its prompt: the cosine between the mean prompt state at the condition layer and the
condition direction must reach the threshold for the intervention to act (at later layers, for the
rest of that sequence).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable

from ggsteer.steering.options import (
    MAX_ABS_STRENGTH,
    OPS,
    OPTIONS,
    WHEN,
    parse_condition_fields,
    parse_option,
    parse_strength,
)
from ggsteer.vectors import UNIT_RAW, ControlVector, TokenAlignedVector, choose_layers
from ggsteer.vectors.projection import SINK_POSITIONS, SINK_SAFE_OPS

__all__ = ["MAX_ABS_STRENGTH", "OPS", "WHEN", "Condition", "Intervention", "make_intervention", "normalize_controls"]
OP_CODES = {name: code for code, name in enumerate(OPS)}
WHEN_CODES = {name: code for code, name in enumerate(WHEN)}


@dataclass(frozen=True)
class Condition:
    """Act only on sequences whose prompt points along `vector` at `layer` (cosine >= threshold)."""

    vector: ControlVector
    threshold: float
    layer: int


@dataclass(frozen=True)
class Intervention:
    vector: ControlVector | TokenAlignedVector
    strength: float
    op: str
    layers: tuple[int, ...]
    when: str = "all"
    first_k: int | None = None
    condition: Condition | None = None
    skip_first: int = 0  # positions < skip_first are left alone (the attention sink)

    @property
    def is_plain_add(self) -> bool:
        """Expressible by llama.cpp's control-vector adapter (which costs nothing)."""
        return (
            self.op == "add" and self.when == "all" and self.first_k is None and self.condition is None
            and self.skip_first == 0
            and isinstance(self.vector, ControlVector) and 0 not in self.layers  # the adapter starts at block 1
        )


def make_intervention(
    vector,
    strength: float,
    n_layer: int,
    n_embd: int,
    *,
    op: str = OPTIONS["op"].default,
    layers: Iterable[int] | str | None = OPTIONS["layers"].default,
    raw: bool = OPTIONS["raw"].default,
    when: str = OPTIONS["when"].default,
    first_k: int | None = OPTIONS["first_k"].default,
    condition: Condition | tuple | None = OPTIONS["condition"].default,
    skip_first: int | None = OPTIONS["skip_first"].default,
) -> Intervention:
    """One steering entry for a model of `n_layer` blocks of width `n_embd`; each option is parsed as
    steering/options.py defines it (ValueError naming the option otherwise)."""
    op, when = parse_option("op", op), parse_option("when", when)
    op, when, layers = _tuned_defaults(vector, op, when, layers)
    strength = parse_strength(strength, bounded=False)
    first_k = parse_option("first_k", first_k)
    skip_first = parse_option("skip_first", skip_first)
    if skip_first is None:
        skip_first = SINK_POSITIONS if op in SINK_SAFE_OPS else 0
    layers = parse_option("layers", layers if layers is None or isinstance(layers, str) else list(layers), n_layer)
    parse_option("raw", raw)
    if vector.n_embd != n_embd:
        raise ValueError(f"vector has n_embd {vector.n_embd} but the model has n_embd {n_embd}: "
                         "it was made for another model")
    if isinstance(vector, TokenAlignedVector):
        if not 0 <= vector.layer < n_layer:
            raise ValueError(f"layer {vector.layer} is beyond the model: it has layers 0..{n_layer - 1}")
        chosen = (vector.layer,)
    else:
        if op in ("add", "add_normalized") and vector.unit == UNIT_RAW and not raw:
            raise ValueError(
                "this vector has no per-layer gap (it was not trained by ggsteer, e.g. repeng or llama.cpp's "
                "cvector-generator wrote it), so a strength has no calibrated unit: pass raw=True (CLI: --raw) "
                "to use the strength as a plain coefficient"
            )
        chosen = tuple(choose_layers(vector, n_layer, layers, allow_layer_zero=True))
    cond = _make_condition(condition, n_layer, n_embd, chosen)
    return Intervention(vector, strength, op, chosen, when, first_k, cond, skip_first)


def _tuned_defaults(vector, op: str | None, when: str | None, layers):
    """op and when left unset: the vector's tuned settings (`ggsteer tune`) when it has them (with
    its tuned layers unless layers are given), else addition on every token."""
    tuned = getattr(vector, "tuned", None) if op is None else None
    if tuned is None:
        return op or "add", when or "all", layers
    return tuned.op, when or tuned.when, tuned.layers if layers is None else layers


def _make_condition(condition, n_layer: int, n_embd: int, layers: tuple[int, ...]) -> Condition | None:
    if condition is None:
        return None
    if not isinstance(condition, Condition):
        vector, threshold, layer = parse_condition_fields(condition, n_layer)
        if not isinstance(vector, ControlVector):
            raise TypeError(f"condition vector must be a ControlVector, got {type(vector).__name__}")
        condition = Condition(vector, threshold, layer)
    if condition.vector.n_embd != n_embd:
        raise ValueError(f"condition vector has n_embd {condition.vector.n_embd} but the model has n_embd {n_embd}")
    if condition.layer not in condition.vector.directions:
        raise ValueError(f"condition layer {condition.layer} is not in the condition vector "
                         f"(it has {condition.vector.layers})")
    if not 0 <= condition.layer < n_layer:
        raise ValueError(f"condition layer {condition.layer} is beyond the model: it has layers 0..{n_layer - 1}")
    if min(layers) <= condition.layer:
        raise ValueError(f"the condition layer {condition.layer} must come before every steered layer "
                         f"(steering {min(layers)}..)")
    if not -1.0 <= condition.threshold <= 1.0:
        raise ValueError(f"condition threshold {condition.threshold} is a cosine: it must lie in [-1, 1]")
    return condition


def normalize_controls(model, control, **options) -> list[Intervention]:
    """The one reading of a "control": None, a ControlVector (at its tuned, else recommended strength, else 1.0),
    a `(vector, strength)` pair (strength None = recommended), an Intervention, or a list of those.
    `options` (op, when, layers, first_k, skip_first, condition, raw: steering/options.py) apply to
    the vectors given without an Intervention. `model` gives n_layer and n_embd."""
    if control is None:
        return []
    if isinstance(control, (Intervention, ControlVector, TokenAlignedVector)) or _is_pair(control):
        control = [control]
    if not isinstance(control, (list, tuple)):
        raise TypeError(f"cannot steer with {type(control).__name__}: "
                        "give a ControlVector, (vector, strength) or Intervention")
    items = []
    for item in control:
        if isinstance(item, Intervention):
            items.append(item)
        elif isinstance(item, (ControlVector, TokenAlignedVector)) or _is_pair(item):
            vector, strength = (item, None) if not _is_pair(item) else item
            strength = default_strength(vector, options.get("op")) if strength is None else strength
            items.append(make_intervention(vector, strength,
                                           model.n_layer, model.n_embd, **options))
        else:
            raise TypeError(f"cannot steer with {type(item).__name__}: "
                            "give a ControlVector, (vector, strength) or Intervention")
    return items


def default_strength(vector, op: str | None = None) -> float:
    """A vector's tuned strength (`ggsteer tune`; only with `op=None`, which means its tuned settings),
    else its recommended strength (set by calibration), else 1.0 (the trained gap)."""
    tuned = getattr(vector, "tuned", None)
    if tuned is not None and op is None:
        return tuned.strength
    return getattr(vector, "recommended_strength", None) or 1.0


def _is_pair(item) -> bool:
    return (isinstance(item, (tuple, list)) and len(item) == 2
            and isinstance(item[0], (ControlVector, TokenAlignedVector))
            and (item[1] is None or isinstance(item[1], numbers.Real)))
