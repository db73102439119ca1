"""The weight edits, in numpy (float64 arithmetic, float32 results).

Orientation as gguf stores it: a projection has numpy shape (n_out, n_in) and computes W @ x, so a
block's writer (attention output, FFN down) has rows indexed by the residual stream's channels; the
token embedding has one row per token.
"""

from __future__ import annotations

import numpy as np


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ValueError("cannot project out a zero vector")
    return v / norm


def writer_direction(u: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
    """The direction a writer must not write along so that the residual gets nothing along u.

    With a post-norm y -> g * y / rms(y), the residual receives g * y / rms(y), whose component
    along u is y . (g * u) / rms(y): zero exactly when y is orthogonal to g * u.
    """
    return unit(u) if post_norm is None else unit(np.asarray(post_norm, np.float64) * u)


def orthonormal_basis(directions: list[np.ndarray], post_norm: np.ndarray | None) -> list[np.ndarray]:
    """An orthonormal basis of the span of the writer directions of several u (see writer_direction)."""
    columns = np.stack([writer_direction(u, post_norm) for u in directions], axis=1)
    q, r = np.linalg.qr(columns)
    keep = np.abs(np.diag(r)) > 1e-9  # drop directions already in the span of the others
    return list(q[:, keep].T)


def orthogonalise_writer(weight: np.ndarray, w: np.ndarray) -> np.ndarray:
    """W - w (w^T W): every output W x has no component along the unit vector w."""
    weight64 = weight.astype(np.float64)
    return (weight64 - np.outer(w, w @ weight64)).astype(np.float32)


def orthogonalise_rows(rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Each row minus its component along the unit vector u (token embeddings)."""
    rows64 = rows.astype(np.float64)
    return (rows64 - np.outer(rows64 @ u, u)).astype(np.float32)


def project_bias(bias: np.ndarray, w: np.ndarray, target_step: float = 0.0) -> np.ndarray:
    """A bias with its component along w replaced by `target_step` (the centered offset)."""
    bias64 = bias.astype(np.float64)
    return (bias64 - (bias64 @ w) * w + target_step * w).astype(np.float32)


def reader_projection(u: np.ndarray, norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) such that W (I - a b^T) reads, through an RMSNorm with weight `norm`, the residual h
    without its component along the unit u: g * (h - (h . u) u) = x - (g * u)((u / g) . x) for the
    normalised x = g * h (the RMS is a common factor). b^T a = 1: an oblique projector. A channel
    with g = 0 is not read at all, so its part of h . u cannot be recovered there (b is 0 there)."""
    g = np.asarray(norm, dtype=np.float64).reshape(-1)
    u = unit(u)
    safe = np.where(g != 0.0, g, 1.0)
    return g * u, np.where(g != 0.0, u / safe, 0.0)


def project_reader(weight: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W - (W a) b^T: the reader applied to its input without the part (b . x) a."""
    weight64 = weight.astype(np.float64)
    return (weight64 - np.outer(weight64 @ a, b)).astype(np.float32)
