"""Steering settings a measurement runs under (lists of Interventions): one per strength of a sweep."""

from __future__ import annotations

import math
from typing import Sequence

from ggsteer.model import SteeredModel
from ggsteer.steering.interventions import Intervention, normalize_controls
from ggsteer.vectors import ControlVector

# steerability: least squares over the strengths within this distance of 0 ...
STEERABILITY_WINDOW = 0.25
# ... or over this many strengths nearest 0 when the window holds fewer
STEERABILITY_MIN_POINTS = 3
SAMPLE_TOKENS = 40


def steered_layers(
    model: SteeredModel, vector: ControlVector, layers: Sequence[int] | None = None, raw: bool = False
) -> list[int]:
    """The layers `model.set_control(vector, layers=layers)` steers; raises if the vector does not fit the model."""
    vector.check_model(model)
    return list(model.intervention(vector, 0.0, layers=layers, raw=raw, op="add").layers)


def settings_per_strength(model, vector, strengths, layers, raw) -> list[list[Intervention]]:
    """The interventions `model.set_control(vector, s, layers=layers, raw=raw)` installs, for each strength s."""
    if len(strengths) == 0:
        raise ValueError("no strengths to evaluate")
    for strength in strengths:
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
    steered_layers(model, vector, layers, raw)  # fail before any decoding
    # op given: sweeps and calibration measure plain addition, never a file's tuned settings
    return [normalize_controls(model, [(vector, float(s))], layers=layers, raw=raw, op="add") for s in strengths]
