"""How well the pairs pin a direction down, per layer.

- stability: the split-half agreement of the direction, corrected to the whole set of pairs. The
  pairs are split into two halves (alternating blocks of `period` pairs, so that each half holds every
  persona of a preset), each half gives its own direction, and their |cos| c is turned into the
  expected |cos| between the direction from all these pairs and the one unlimited pairs would give:
  with noise of total variance v around a mean difference m, a half of n/2 pairs agrees with the
  other as c = 1 / (1 + 2 r) where r = v / (n |m|^2), and the whole set agrees with the limit as
  1 / sqrt(1 + r). Training in rounds (train/rounds.py) stops once this is high enough.
- consistency: the mean cosine between the pair differences themselves (every pair with every
  other). Braun et al. 2025 (arXiv 2505.22637) found that how consistent these differences are
  predicts whether a vector steers at all; a vector whose differences are inconsistent is flagged.
"""

from __future__ import annotations

import numpy as np

from ggsteer.train import methods


def pair_consistency(diffs: np.ndarray) -> float:
    """Mean cosine between distinct pair differences [n_pairs, n_embd] (0 for fewer than two)."""
    norms = np.linalg.norm(diffs, axis=1)
    units = diffs[norms > 0] / norms[norms > 0, None]
    n = len(units)
    if n < 2:
        return 0.0
    total = units.sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def half_masks(n_pairs: int, period: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Alternating blocks of `period` pairs: the two halves of a split."""
    block = np.arange(n_pairs) // max(1, period)
    return block % 2 == 0, block % 2 == 1


def split_half_stability(pos: np.ndarray, neg: np.ndarray, method: str, period: int = 1) -> float | None:
    """Expected |cos| of the direction from these pairs [n_pairs, n_embd] with the limit of unlimited
    pairs, from the agreement of its two halves (None when a half would be empty)."""
    first, second = half_masks(len(pos), period)
    if not first.any() or not second.any():
        return None
    directions = []
    for half in (first, second):
        try:
            directions.append(methods.DIRECTION_FUNCTIONS[method](pos[half], neg[half]))
        except ValueError:  # the half's states coincide: no direction at all
            return 0.0
    agreement = abs(float(directions[0] @ directions[1]))
    return corrected_stability(agreement)


def corrected_stability(agreement: float) -> float:
    """Split-half |cos| -> expected |cos| of the whole set with the limit (see the module docstring)."""
    if agreement <= 0.0:
        return 0.0
    ratio = (1.0 / agreement - 1.0) / 2.0
    return float(1.0 / np.sqrt(1.0 + ratio))


def layer_stability(hidden: np.ndarray, method: str, period: int = 1) -> list[float] | None:
    """`split_half_stability` of every layer of `hidden` [2 * n_pairs, layers, n_embd] (pos, neg, ...)."""
    pos = hidden[0::2].astype(np.float64)
    neg = hidden[1::2].astype(np.float64)
    values = [split_half_stability(pos[:, k], neg[:, k], method, period) for k in range(hidden.shape[1])]
    return None if any(v is None for v in values) else values


def stability_metadata(hidden: np.ndarray, method: str, period: int = 1) -> dict[str, list[float]]:
    """The per-layer `stability` and `consistency` a vector file stores (what can be computed)."""
    diffs = hidden[0::2].astype(np.float64) - hidden[1::2].astype(np.float64)
    metadata = {"consistency": [pair_consistency(diffs[:, k]) for k in range(hidden.shape[1])]}
    stability = layer_stability(hidden, method, period)
    if stability is not None:
        metadata["stability"] = stability
    return metadata
