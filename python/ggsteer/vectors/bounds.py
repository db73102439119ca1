"""How large a loaded direction may be: the rule every file passes before it steers anything.

The rule, in one sentence: every value of a direction lies within +-MAX_ABS_VALUE, and where the
file stores the layer's typical residual norm (`ggsteer.residual_norm`), the direction's norm is at
most MAX_RESIDUAL_RATIO times that norm; `allow_large=True` (or GGSTEER_ALLOW_LARGE_VECTORS=1 for
the CLI and the server) loads a file anyway.

Why: a finite but huge direction (3e38, or 1e30) passes the NaN/Inf check, then overflows the
model's float32 normalisation (a sum of squares) and turns the logits into NaN. Real directions are
far smaller: a trained gap is a fraction of the residual norm, and repeng's and llama.cpp's
cvector-generator's directions have norm 1. The absolute bound leaves room for residual streams with
massive activations (values of several thousand) at any strength a request may ask for (up to 10),
without the sum of squares coming near float32's limit.
"""

from __future__ import annotations

import os

import numpy as np

from ggsteer.vectors.file import VectorFileError

MAX_ABS_VALUE = 1e6
MAX_RESIDUAL_RATIO = 10.0
ALLOW_LARGE_ENV = "GGSTEER_ALLOW_LARGE_VECTORS"


class VectorTooLargeError(VectorFileError):
    """A direction breaks the size rule (see this module); the message names the file, layer and value."""


def allow_large_from_env() -> bool:
    return os.environ.get(ALLOW_LARGE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_direction_sizes(directions: dict[int, np.ndarray], residual_norms: dict[int, float], where: str) -> None:
    """Raise VectorTooLargeError for the first direction that breaks the size rule."""
    override = f"load it with allow_large=True (CLI and server: {ALLOW_LARGE_ENV}=1) if it is meant to be"
    for layer, direction in directions.items():
        values = np.abs(np.asarray(direction, dtype=np.float64))  # float64: the squares of 3e38 stay finite
        peak = float(values.max(initial=0.0))
        if peak > MAX_ABS_VALUE:
            raise VectorTooLargeError(f"{where}: direction.{layer} holds a value of {peak:.3g}, beyond the bound of "
                                      f"+-{MAX_ABS_VALUE:g} on any direction; {override}")
        reference = residual_norms.get(layer, 0.0)
        norm = float(np.sqrt(np.sum(values * values)))
        if reference > 0 and norm > MAX_RESIDUAL_RATIO * reference:
            raise VectorTooLargeError(
                f"{where}: direction.{layer} has norm {norm:.4g}, {norm / reference:.3g} times the layer's stored "
                f"residual norm {reference:.4g} (at most {MAX_RESIDUAL_RATIO:g} times); {override}")
