"""Steering settings a measurement runs under: one per strength of a sweep."""

from __future__ import annotations

import functools
import math
from typing import Callable, ContextManager, Sequence

from ggsteer.model import SteeredModel
from ggsteer.vectors import ControlVector

# a function entering one steering setting: `with setting(): ...` runs under it
Setting = Callable[[], ContextManager]
# steerability: least squares over the strengths within this distance of 0 ...
STEERABILITY_WINDOW = 0.25
# ... or over this many strengths nearest 0 when the window holds fewer
STEERABILITY_MIN_POINTS = 3
SAMPLE_TOKENS = 40


def under_each(settings: Sequence[Setting], measure: Callable[[], object], tick: Callable[[], None] | None = None) -> list:
    """`measure()` under each steering setting in turn."""
    results = []
    for setting in settings:
        with setting():
            results.append(measure())
        if tick is not None:
            tick()
    return results


def steered_layers(
    model: SteeredModel, vector: ControlVector, layers: Sequence[int] | None = None, raw: bool = False
) -> list[int]:
    """The layers `model.set_control(vector, layers=layers)` steers; raises if the vector does not fit the model."""
    vector.check_model(model)
    return list(model.intervention(vector, 0.0, layers=layers, raw=raw).layers)


def settings_per_strength(model, vector, strengths, layers, raw) -> list[Setting]:
    if len(strengths) == 0:
        raise ValueError("no strengths to evaluate")
    for strength in strengths:
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
    steered_layers(model, vector, layers, raw)  # fail before any decoding
    return [functools.partial(model.steer, vector, float(s), layers=layers, raw=raw) for s in strengths]
