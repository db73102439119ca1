"""What `ablate` and `clamp` act on, so that projecting a direction out keeps the model fluent.

Measured on Gemma 3 270M (benchmarks/ablation_study.py, README "Ablation that keeps the model
fluent"), two things broke the text when every row's projection on the trained unit direction u
was set to the neutral point:

- the attention sink: the first position carries a massive activation (row norm 7-15x every other
  row's) that every later token attends to. Clamping its projection to a center measured on
  ordinary tokens rewrites it by tens of thousands, so the hook leaves the first `SINK_POSITIONS`
  positions alone;
- the residual stream's shared mean direction m (every token points roughly along it): trained
  directions are partly aligned with it (|cos| up to 0.7), so clamping along u also flattens the
  part of every token that has nothing to do with the behaviour. The op therefore acts on
  u' = (u - (u . m) m) / |...|, the part of u orthogonal to m, with its own neutral point and gap
  measured on the training pairs. Training stores m per layer (`mean_direction`, the unit mean of
  the training prompts' last-token states: ordinary, non-sink tokens) and the statistics along u'
  (`orth_center`, `orth_gap`).

Vectors without these statistics (older files, repeng or llama.cpp files, sums of vectors) are
clamped along u itself, to their stored `center` or 0, as before; the sink is left alone anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ggsteer.vector import ControlVector

# positions left alone by ablate and clamp by default: the attention sink (BOS)
SINK_POSITIONS = 1
# ops that leave the sink alone unless told otherwise
SINK_SAFE_OPS = ("ablate", "clamp")


@dataclass(frozen=True)
class OrthogonalFit:
    """One layer's statistics along u' (u orthogonalised against the shared mean direction m)."""

    mean_direction: np.ndarray  # unit m, float32 [n_embd]
    center: float  # mean projection of the pair midpoints on u'
    gap: float  # mean of (positive - negative) projected on u'


def orthogonal_direction(direction: np.ndarray, mean_direction: np.ndarray) -> np.ndarray:
    """Unit u' = the part of `direction` orthogonal to the unit `mean_direction` (float64)."""
    u = np.asarray(direction, dtype=np.float64)
    u = u / np.linalg.norm(u)
    m = np.asarray(mean_direction, dtype=np.float64)
    rest = u - (u @ m) * m
    norm = float(np.linalg.norm(rest))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError("the direction is the residual stream's mean direction itself: nothing is left to project out")
    return rest / norm


def fit_orthogonal(pos: np.ndarray, neg: np.ndarray, direction: np.ndarray) -> OrthogonalFit:
    """m from the training states of both sides [n_pairs, n_embd], and center and gap along u'."""
    pos64 = pos.astype(np.float64)
    neg64 = neg.astype(np.float64)
    mean = np.concatenate([pos64, neg64]).mean(axis=0)
    m = mean / np.linalg.norm(mean)
    u_orth = orthogonal_direction(direction, m)
    return OrthogonalFit(
        mean_direction=m.astype(np.float32),
        center=float((((pos64 + neg64) / 2.0) @ u_orth).mean()),
        gap=float(((pos64 - neg64) @ u_orth).mean()),
    )


def projection_for_layer(vector: "ControlVector", layer: int, op: str, strength: float) -> tuple[np.ndarray, float]:
    """The unit direction `ablate`/`clamp` act on at `layer` and the projection they set there.

    `ablate` is `clamp` at strength 0. With training's statistics: u' and orth_center +
    strength * orth_gap; without: u and center (0 when unknown) + strength * |v|.
    """
    v = vector.directions[layer]
    mean_direction = vector.layer_vector("mean_direction").get(layer)
    orth_center = vector.layer_stat("orth_center").get(layer)
    orth_gap = vector.layer_stat("orth_gap").get(layer)
    shift = 0.0 if op == "ablate" else float(strength)
    if mean_direction is not None and orth_center is not None and orth_gap is not None:
        return orthogonal_direction(v, mean_direction).astype(np.float32), orth_center + shift * orth_gap
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError("cannot ablate or clamp along a zero vector")
    center = vector.layer_stat("center").get(layer, 0.0)
    return (v / norm).astype(np.float32), center + shift * norm
