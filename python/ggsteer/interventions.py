"""Interventions addition cannot express, compiled into a program for the native hook.

Each operation acts on a block's output rows h (llama.cpp's `l_out-i`), per layer and per row:

- `add`: h += s * v (what llama.cpp's adapter does, but here per sequence or gated);
- `ablate`: the projection on a unit direction u set to the neutral point c: h += (c - h . u) u.
  For vectors trained by ggsteer, u is the trained direction without its components along the
  few directions every ordinary token shares, and c the mean projection of the training pairs'
  midpoints on it (`ggsteer.projection` says why: projecting along the raw direction flattens
  every token).
  Removing the whole projection would also remove the baseline every text has along u, which can
  push toward either side. Vectors without these statistics use u = v / |v| and c = their `center`
  or 0 (plain directional ablation h -= (h . u) u);
- `clamp`: the projection held at t = c + s * gap: s in strength units (the layer's trained gap
  along u), so `clamp 0` is `ablate` and `clamp 1` sits one gap past neutral;
- `add_normalized`: add, then rescale each row back to its norm before the addition.

Gating: `when="prompt"` (prompt tokens only), `"generated"` (generated tokens only), `first_k=k`
(positions < k only), `skip_first=k` (positions < k left alone: ablate and clamp leave the
attention sink, position 0, alone by default; 0 acts on every row). A `Condition` (CAST) decides per sequence from its prompt: the cosine between
the mean prompt state at the condition layer and the condition direction must reach the threshold
for the intervention to act (at later layers, for the rest of that sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ggsteer.projection import SINK_POSITIONS, SINK_SAFE_OPS, projection_for_layer
from ggsteer.steer import _choose_layers
from ggsteer.vector import UNIT_RAW, ControlVector

OPS = ("add", "ablate", "clamp", "add_normalized")
WHEN = ("all", "prompt", "generated")
OP_CODES = {name: code for code, name in enumerate(OPS)}
WHEN_CODES = {name: code for code, name in enumerate(WHEN)}


@dataclass(frozen=True)
class Condition:
    """Act only on sequences whose prompt points along `vector` at `layer` (cosine >= threshold)."""

    vector: ControlVector
    threshold: float
    layer: int


@dataclass(frozen=True)
class TokenAlignedVector:
    """ActAdd: one vector per position at one layer, added to the first positions of a sequence."""

    layer: int
    rows: np.ndarray  # float32 [n_positions, n_embd]
    model_hint: str = ""

    @property
    def n_embd(self) -> int:
        return int(self.rows.shape[1])


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
    op: str = "add",
    layers: Iterable[int] | None = None,
    raw: bool = False,
    when: str = "all",
    first_k: int | None = None,
    condition: Condition | tuple | None = None,
    skip_first: int | None = None,
) -> Intervention:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: choose one of {', '.join(OPS)}")
    if when not in WHEN:
        raise ValueError(f"unknown when {when!r}: choose one of {', '.join(WHEN)}")
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}")
    if first_k is not None and (int(first_k) != first_k or first_k < 1):
        raise ValueError(f"first_k must be a positive integer, got {first_k}")
    if skip_first is None:
        skip_first = SINK_POSITIONS if op in SINK_SAFE_OPS else 0
    if isinstance(skip_first, bool) or int(skip_first) != skip_first or skip_first < 0:
        raise ValueError(f"skip_first must be a non-negative integer, got {skip_first}")
    if vector.n_embd != n_embd:
        raise ValueError(f"vector has n_embd {vector.n_embd} but the model has n_embd {n_embd}: it was made for another model")
    if isinstance(vector, TokenAlignedVector):
        if not 0 <= vector.layer < n_layer:
            raise ValueError(f"layer {vector.layer} is beyond the model: it has layers 0..{n_layer - 1}")
        chosen = (vector.layer,)
    else:
        if op in ("add", "add_normalized") and vector.unit == UNIT_RAW and not raw:
            raise ValueError("this vector has no per-layer gap (not trained by ggsteer): pass raw=True to use the strength as a plain coefficient")
        chosen = tuple(_choose_layers(vector, n_layer, layers, allow_layer_zero=True))
    cond = _make_condition(condition, n_layer, n_embd, chosen)
    return Intervention(vector, strength, op, chosen, when, None if first_k is None else int(first_k), cond, int(skip_first))


def _make_condition(condition, n_layer: int, n_embd: int, layers: tuple[int, ...]) -> Condition | None:
    if condition is None:
        return None
    if not isinstance(condition, Condition):
        vector, threshold, layer = condition
        condition = Condition(vector, float(threshold), int(layer))
    if condition.vector.n_embd != n_embd:
        raise ValueError(f"condition vector has n_embd {condition.vector.n_embd} but the model has n_embd {n_embd}")
    if condition.layer not in condition.vector.directions:
        raise ValueError(f"condition layer {condition.layer} is not in the condition vector (it has {condition.vector.layers})")
    if not 0 <= condition.layer < n_layer:
        raise ValueError(f"condition layer {condition.layer} is beyond the model: it has layers 0..{n_layer - 1}")
    if min(layers) <= condition.layer:
        raise ValueError(f"the condition layer {condition.layer} must come before every steered layer (steering {min(layers)}..)")
    if not -1.0 <= condition.threshold <= 1.0:
        raise ValueError(f"condition threshold {condition.threshold} is a cosine: it must lie in [-1, 1]")
    return condition


@dataclass
class Program:
    """The arrays `native.Hook.set_program` takes."""

    ops: np.ndarray  # int32 [n, 8]
    coeffs: np.ndarray
    vector_offsets: np.ndarray
    condition_layers: np.ndarray
    condition_thresholds: np.ndarray
    condition_offsets: np.ndarray
    vectors: np.ndarray
    n_slots: int

    def install(self, hook) -> None:
        hook.set_program(self.ops, self.coeffs, self.vector_offsets, self.condition_layers,
                         self.condition_thresholds, self.condition_offsets, self.vectors, self.n_slots)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError("cannot ablate or clamp along a zero vector")
    return (v / norm).astype(np.float32)


def compile_program(
    per_slot: Sequence[Sequence[Intervention]], global_interventions: Sequence[Intervention] = (), n_slots: int = 1
) -> Program:
    """Lay interventions out for the hook: slot i gets per_slot[i]; globals apply to every row.

    `n_slots` sequence slots keep their own condition state (a sequence's slot is its seq id).
    """
    pool: list[np.ndarray] = []
    size = 0
    ops, coeffs, offsets = [], [], []
    conditions: dict[int, tuple[int, float, int]] = {}

    def add_vector(v: np.ndarray) -> int:
        nonlocal size
        pool.append(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
        offset = size
        size += pool[-1].size
        return offset

    def condition_index(cond: Condition | None) -> int:
        if cond is None:
            return -1
        key = id(cond)
        if key not in conditions:
            offset = add_vector(_unit(cond.vector.directions[cond.layer]))
            conditions[key] = (len(conditions), cond.layer, cond.threshold, offset)
        return conditions[key][0]

    slotted = [(-1, item) for item in global_interventions] + [(s, item) for s, items in enumerate(per_slot) for item in items]
    for slot, item in slotted:
        cond = condition_index(item.condition)
        for layer in item.layers:
            vector, coeff, n_rows = _op_vector(item, layer)
            kind = OP_CODES["clamp"] if item.op == "ablate" else OP_CODES[item.op]
            first_k = -1 if item.first_k is None else item.first_k
            ops.append([kind, layer, slot, WHEN_CODES[item.when], first_k, cond, n_rows, item.skip_first])
            coeffs.append(coeff)
            offsets.append(add_vector(vector))
    ordered = sorted(conditions.values())
    return Program(
        ops=np.asarray(ops, dtype=np.int32).reshape(-1, 8),
        coeffs=np.asarray(coeffs, dtype=np.float32),
        vector_offsets=np.asarray(offsets, dtype=np.int64),
        condition_layers=np.asarray([c[1] for c in ordered], dtype=np.int32),
        condition_thresholds=np.asarray([c[2] for c in ordered], dtype=np.float32),
        condition_offsets=np.asarray([c[3] for c in ordered], dtype=np.int64),
        vectors=np.concatenate(pool) if pool else np.zeros(0, np.float32),
        n_slots=max(1, len(per_slot), n_slots),
    )


def _op_vector(item: Intervention, layer: int) -> tuple[np.ndarray, float, int]:
    """The vector the kernel reads, its coefficient, and how many position rows it has."""
    if isinstance(item.vector, TokenAlignedVector):
        return item.vector.rows, item.strength, item.vector.rows.shape[0]
    if item.op in ("ablate", "clamp"):
        direction, target = projection_for_layer(item.vector, layer, item.op, item.strength)
        return direction, target, 1
    return item.vector.directions[layer], item.strength, 1
