"""What `ablate` and `clamp` act on, so that projecting a direction out keeps the model fluent.

Setting every row's projection on the trained unit direction u to the neutral point breaks a
model's text, for two reasons (measurements: docs/interventions.md, "Ablation that keeps the model
fluent"):

- the attention sink: the first position carries a massive activation that every later token
  attends to. Clamping its projection to a center measured on ordinary tokens rewrites it, so the
  hook leaves the first `SINK_POSITIONS` positions alone;
- directions every token shares: the residual stream of ordinary tokens lies largely along a few
  directions (its mean direction first), and trained directions overlap them. Clamping along u
  flattens that shared part of every token. The ops act on u' instead: u with its components along
  the top `SHARED_DIRECTIONS` principal directions of ordinary token states (uncentred, non-sink
  tokens of the training prompts) removed, with its own neutral point and gap measured on the
  training pairs.

The sink's own state is removed from u' too (`kept_out_directions`): position 0 sees only itself, so
its state at a layer is the same in every prompt, and u' orthogonal to it means ablate and clamp
move the sink by the small target alone, even where a position cannot be left alone
(`skip_first=0`, a weight bake).

What u' starts from: the difference of the pairs' states averaged over every token of each prompt
(`mean_pooled_difference` over `ABLATION_PAIRS` pairs), not the trained direction, which is read at
the last token only. Ablation rewrites every token, and the behaviour a persona instruction carries
to later tokens lives along the tokens' average difference. The center and gap stay those of the
training states (the last token by default) along u', so clamp +-1 still means one trained gap.

Training stores, per layer, u' (`ablation_direction`), the center (`ablation_center`) and the gap
(`ablation_gap`) along it. Vectors without them (older files, repeng or llama.cpp files, sums of
vectors) are clamped along u itself, to their stored `center` or 0, as before; the sink is left
alone anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ggsteer.vectors.layers import unit_vector

if TYPE_CHECKING:
    from ggsteer.vectors.control_vector import ControlVector

# positions left alone by ablate and clamp by default: the attention sink (BOS)
SINK_POSITIONS = 1
# ops that leave the sink alone unless told otherwise
SINK_SAFE_OPS = ("ablate", "clamp")
# shared directions removed from u: the fewest that kept every preset fluent while the behaviour was
# still removed (docs/interventions.md compares 1, 2, 4 and 16)
SHARED_DIRECTIONS = 4
# training prompts whose every (non-sink) token state estimates the shared directions
SHARED_PROMPTS = 32
# training pairs whose mean-pooled states give the direction ablate and clamp act on
ABLATION_PAIRS = 64


@dataclass(frozen=True)
class ProjectionFit:
    """One layer's direction for ablate/clamp and the statistics of the training pairs along it."""

    direction: np.ndarray  # unit u', float32 [n_embd]
    center: float  # mean projection of the pair midpoints on u'
    gap: float  # mean of (positive - negative) projected on u'


def shared_directions(token_states: np.ndarray, k: int = SHARED_DIRECTIONS) -> np.ndarray:
    """The top-k principal directions [k, n_embd] of ordinary token states [n_tokens, n_embd], uncentred
    (so the mean direction comes first)."""
    rows = np.asarray(token_states, dtype=np.float64)
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError("shared directions need at least one token state")
    # the SVD's top right singular vectors (up to sign, which a span does not need) from the
    # eigenvectors of the smaller Gram matrix, at a fraction of a full SVD's cost
    n_rows, n_embd = rows.shape
    k = min(k, n_rows, n_embd)
    if n_rows >= n_embd:
        _, vectors = np.linalg.eigh(rows.T @ rows)  # ascending
        return vectors[:, ::-1][:, :k].T
    _, left = np.linalg.eigh(rows @ rows.T)
    directions = rows.T @ left[:, ::-1][:, :k]  # v_i = X^T u_i / s_i: normalise instead of dividing
    return (directions / np.linalg.norm(directions, axis=0)).T


def kept_out_directions(token_states: Sequence[np.ndarray], k: int) -> np.ndarray:
    """An orthonormal basis [m, n_embd] of what u' must not contain at layer slot k of per-prompt
    states [n_tokens, n_layers, n_embd]: the shared directions of the non-sink tokens and the
    direction of the sink rows' states (one: the same in every prompt that starts with BOS)."""
    sink_rows = np.concatenate([s[:SINK_POSITIONS, k] for s in token_states])
    directions = np.vstack([shared_directions(non_sink_rows(token_states, k)),
                            shared_directions(sink_rows, k=SINK_POSITIONS)])
    q, r = np.linalg.qr(directions.T)
    return q[:, np.abs(np.diag(r)) > 1e-9].T  # a sink already in the shared span adds nothing


def remove_shared(direction: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Unit u' = `direction` without its components along the orthonormal rows of `shared` (float64)."""
    u = np.asarray(direction, dtype=np.float64)
    u = u / np.linalg.norm(u)
    basis = np.asarray(shared, dtype=np.float64)
    rest = u - basis.T @ (basis @ u)
    norm = float(np.linalg.norm(rest))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError("the direction lies in the directions every token shares: nothing is left to project out")
    return rest / norm


def fit_projection(pos: np.ndarray, neg: np.ndarray, direction: np.ndarray, shared: np.ndarray) -> ProjectionFit:
    """u' from the trained `direction` and the `shared` directions, with center and gap of the
    training pairs' states [n_pairs, n_embd] along it."""
    pos64 = pos.astype(np.float64)
    neg64 = neg.astype(np.float64)
    u = remove_shared(direction, shared)
    return ProjectionFit(
        direction=u.astype(np.float32),
        center=float((((pos64 + neg64) / 2.0) @ u).mean()),
        gap=float(((pos64 - neg64) @ u).mean()),
    )


def ablation_prompts(prompts: Sequence[str], n_pairs: int = ABLATION_PAIRS) -> list[str]:
    """Up to `n_pairs` whole pairs spread evenly over the training prompts (positive, negative, ...)."""
    n_all = len(prompts) // 2
    chosen = range(n_all) if n_all <= n_pairs else np.linspace(0, n_all - 1, n_pairs).round().astype(int)
    return [prompts[2 * int(i) + side] for i in chosen for side in (0, 1)]


def mean_pooled_difference(states: np.ndarray) -> np.ndarray:
    """Mean over pairs of (positive - negative) of mean-pooled states [2 * n_pairs, n_embd], alternating."""
    rows = np.asarray(states, dtype=np.float64)
    return rows[0::2].mean(axis=0) - rows[1::2].mean(axis=0)


def shared_prompts(prompts: Sequence[str], n: int = SHARED_PROMPTS) -> list[str]:
    """`n` prompts spread evenly over the training prompts (both sides of many pairs)."""
    if len(prompts) <= n:
        return list(prompts)
    return [prompts[int(i)] for i in np.linspace(0, len(prompts) - 1, n).round()]


def non_sink_rows(states: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Rows of layer slot k of per-prompt states [n_tokens, n_layers, n_embd], sink positions left out."""
    rows = [s[SINK_POSITIONS:, k] for s in states if len(s) > SINK_POSITIONS]
    if not rows:
        raise ValueError(f"the training prompts are too short: none has a token past the first {SINK_POSITIONS}")
    return np.concatenate(rows)


def projection_for_layer(vector: "ControlVector", layer: int, op: str, strength: float) -> tuple[np.ndarray, float]:
    """The unit direction `ablate`/`clamp` act on at `layer` and the projection they set there.

    `ablate` is `clamp` at strength 0. With training's statistics: u' and ablation_center +
    strength * ablation_gap; without: u = v / |v| and center (0 when unknown) + strength * |v|.
    """
    v = vector.directions[layer]
    direction = vector.layer_vector("ablation_direction").get(layer)
    center = vector.layer_stat("ablation_center").get(layer)
    gap = vector.layer_stat("ablation_gap").get(layer)
    shift = 0.0 if op == "ablate" else float(strength)
    if direction is not None and center is not None and gap is not None:
        return direction.astype(np.float32), center + shift * gap
    norm = float(np.linalg.norm(v))
    unit = unit_vector(v, "cannot ablate or clamp along a zero vector").astype(np.float32)
    return unit, vector.layer_stat("center").get(layer, 0.0) + shift * norm
