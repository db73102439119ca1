"""Reduce paired activations to one direction per layer.

Every method returns a unit direction per layer whose sign points from the negative side to the
positive side (the majority of pairs project higher on their positive prompt; ties broken by the
mean gap). What the file stores and what strength 1.0 means is decided by the caller: see
`LayerFit.gap`.

- `pca_diff`: first principal component of the pair differences, centred as repeng's
  `pca_diff` does (sklearn's PCA subtracts their mean; on datasets whose differences are mostly
  one shared shift that mean is the signal, and the component can miss it).
- `pca_center`: repeng's `pca_center`: each pair is centred on its own midpoint, then the first
  principal component of both halves (an uncentred PCA of the differences).
- `mean_diff`: mean of positive minus negative (CAA).
- `probe`: a logistic-regression probe separating positive from negative activations; the
  direction is its normalised weight vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggsteer.vectors.layers import unit_vector

METHODS = ("mean_diff", "pca_diff", "pca_center", "probe")
# separation (fraction of pairs ordered correctly) below this is treated as near chance
NEAR_CHANCE_SEPARATION = 0.6


@dataclass(frozen=True)
class LayerFit:
    direction: np.ndarray  # unit vector, float32 [n_embd], sign: negative -> positive
    separation: float  # fraction of pairs whose positive projects above its negative
    gap: float  # mean of (positive - negative) projected on `direction`: the strength unit
    residual_norm: float  # mean L2 norm of the layer's activations (both sides)
    center: float  # mean projection of the pair midpoints on `direction`: the neutral point


def _unit(vector: np.ndarray) -> np.ndarray:
    return unit_vector(vector, "the direction has zero or non-finite length: "
                               "positive and negative activations coincide")


def _first_component(data: np.ndarray, *, center: bool) -> np.ndarray:
    """First right-singular vector of `data` [n, d] (its sign is left to `orient`).

    Exact and deterministic, unlike sklearn's randomized PCA solver (repeng issue #78): the top
    eigenvector of the smaller Gram matrix, n x n when there are fewer rows than dimensions (a few
    hundred pairs against n_embd), mapped back through `data.T`; a fraction of a full SVD's cost.
    """
    if center:
        data = data - data.mean(axis=0, keepdims=True)
    # either way the vector's length is the top singular value: zero when the data is all zeros
    if data.shape[0] < data.shape[1]:
        _, u = _top_eigenpair(data @ data.T)
        return data.T @ u
    value, v = _top_eigenpair(data.T @ data)
    return v * np.sqrt(max(value, 0.0))


def _top_eigenpair(gram: np.ndarray) -> tuple[float, np.ndarray]:
    values, vectors = np.linalg.eigh(gram)  # ascending
    return float(values[-1]), vectors[:, -1]


def direction_mean_diff(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return _unit((pos - neg).mean(axis=0))


def direction_pca_diff(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    return _unit(_first_component(pos - neg, center=True))


def direction_pca_center(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    # both halves centred on their pair's midpoint are +-(pos - neg)/2: stacked, their uncentred
    # covariance is (pos - neg)'s divided by 2, so the component is that of the differences
    return _unit(_first_component(pos - neg, center=False))


def direction_probe(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    features = np.concatenate([pos, neg])
    # residual norms reach 1e4: rescale so the solver converges; the direction is scale-free
    scale = np.linalg.norm(features, axis=1).mean() or 1.0
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    probe = LogisticRegression(C=1.0, max_iter=2000, tol=1e-6)
    probe.fit(features / scale, labels)
    return _unit(probe.coef_[0])


DIRECTION_FUNCTIONS = {
    "mean_diff": direction_mean_diff,
    "pca_diff": direction_pca_diff,
    "pca_center": direction_pca_center,
    "probe": direction_probe,
}


def orient(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Flip `direction` so most pairs project higher on their positive side."""
    diffs = (pos - neg) @ direction
    votes = np.sign(diffs).sum()
    if votes < 0 or (votes == 0 and diffs.mean() < 0):
        return -direction
    return direction


def fit_layer(pos: np.ndarray, neg: np.ndarray, method: str) -> LayerFit:
    """Direction and statistics of one layer from paired activations [n_pairs, n_embd]."""
    if method not in DIRECTION_FUNCTIONS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    pos64 = pos.astype(np.float64)
    neg64 = neg.astype(np.float64)
    direction = orient(DIRECTION_FUNCTIONS[method](pos64, neg64), pos64, neg64)
    diffs = (pos64 - neg64) @ direction
    norms = np.linalg.norm(np.concatenate([pos64, neg64]), axis=1)
    return LayerFit(
        direction=direction.astype(np.float32),
        separation=float((diffs > 0).mean()),
        gap=float(diffs.mean()),
        residual_norm=float(norms.mean()),
        center=float((((pos64 + neg64) / 2.0) @ direction).mean()),
    )
