"""Compile interventions into the arrays the native hook runs (one row per op and layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ggsteer.steering.interventions import OP_CODES, WHEN_CODES, Condition, Intervention
from ggsteer.vectors import TokenAlignedVector
from ggsteer.vectors.layers import unit_vector
from ggsteer.vectors.projection import projection_for_layer


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
            offset = add_vector(_unit_along(cond.vector.directions[cond.layer]))
            conditions[key] = (len(conditions), cond.layer, cond.threshold, offset)
        return conditions[key][0]

    slotted = [(-1, item) for item in global_interventions] + [
        (s, item) for s, items in enumerate(per_slot) for item in items]
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


def _unit_along(v: np.ndarray) -> np.ndarray:
    return unit_vector(v, "cannot ablate or clamp along a zero vector").astype(np.float32)
