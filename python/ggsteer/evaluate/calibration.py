"""Calibration: the strength (and layer range) with the largest behaviour gain under a KL bound,
written into the vector's metadata as its recommended strength and layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ggsteer.evaluate.sweeps import Sweep
from ggsteer.train import dataset_hash, list_presets, preset_dataset
from ggsteer.vectors import ControlVector

# -- calibration ------------------------------------------------------------------------------


EVAL_STRENGTHS = "-0.3:0.3:13"
CALIBRATE_STRENGTHS = "0.1:1.5:15"
# On Gemma 3 270M's presets this bound lands on a clearly steered but still fluent strength, the one the
# demo uses (docs/benchmarks.md, "Training methods", lists what calibrate picks under it).
DEFAULT_MAX_KL = 0.25
# the exponent of KL against strength that a prediction assumes from one point (KL ~ strength squared
# for small pushes), and the range a measured one is kept in (a flat or steep secant would overshoot)
KL_EXPONENT = 2.0
KL_EXPONENT_RANGE = (0.5, 4.0)


def power_law_strength(first: tuple[float, float], second: tuple[float, float] | None, target: float) -> float:
    """The strength whose KL should equal `target`, KL growing as a power of the strength: the
    exponent from two measured (strength, KL) points, or KL_EXPONENT from one (or when the two cannot
    give one), extrapolated from `first`."""
    s1, k1 = first
    exponent = KL_EXPONENT
    if second is not None:
        s2, k2 = second
        if s1 > 0 and s2 > 0 and s1 != s2 and k1 > 0 and k2 > 0 and k1 != k2:
            exponent = math.log(k2 / k1) / math.log(s2 / s1)
    low, high = KL_EXPONENT_RANGE
    exponent = min(high, max(low, exponent)) if math.isfinite(exponent) else KL_EXPONENT
    return s1 * (target / k1) ** (1.0 / exponent)


@dataclass(frozen=True)
class Calibration:
    strength: float
    layers: list[int]
    gain: float  # behaviour gain over the unsteered model at that strength, nats
    kl: float  # its KL(unsteered || steered)
    max_kl: float  # the bound it was chosen under


def choose_calibration(sweeps: Sequence[Sweep], max_kl: float) -> Calibration:
    """The positive strength (and layer range) with the largest behaviour gain whose KL <= max_kl."""
    candidates = [(sweep, p) for sweep in sweeps for p in sweep.points
                  if p.strength > 0 and p.kl <= max_kl and p.gain > 0]
    if not candidates:
        positive = [p for sweep in sweeps for p in sweep.points if p.strength > 0]
        if not positive:
            raise ValueError("calibration needs positive strengths (toward the positive persona)")
        least_kl = min(p.kl for p in positive)
        raise ValueError(
            f"no positive strength raised the behaviour score with KL <= {max_kl:g} "
            f"(the smallest KL was {least_kl:.3g}): try smaller strengths or a larger --max-kl"
        )
    sweep, best = max(candidates, key=lambda c: c[1].gain)
    return Calibration(best.strength, list(sweep.layers), best.gain, best.kl, float(max_kl))


def calibrated_vector(vector: ControlVector, calibration: Calibration, preset: str | None = None) -> ControlVector:
    """A copy of `vector` whose metadata recommends the calibrated strength and layers."""
    metadata = dict(vector.metadata)
    metadata.update(
        recommended_strength=calibration.strength,
        recommended_layers=list(calibration.layers),
        calibration_max_kl=calibration.max_kl,
        calibration_kl=calibration.kl,
        calibration_gain=calibration.gain,
    )
    if preset is not None:
        metadata["eval_preset"] = preset
    return ControlVector(dict(vector.directions), vector.model_hint, metadata)


def infer_preset(vector: ControlVector, chat_template=None) -> str | None:
    """The preset a vector is evaluated on: its `eval_preset` metadata (written by calibration),
    else the preset whose full dataset (as `ggsteer train --preset` makes it, with or without the
    model's chat template) has the vector's dataset hash; None when neither tells."""
    if isinstance(vector.metadata.get("eval_preset"), str):
        return str(vector.metadata["eval_preset"])
    wanted = vector.metadata.get("dataset_hash")
    if not wanted:
        return None
    templates = [None] if chat_template is None else [None, chat_template]
    for preset in list_presets():
        for template in templates:
            if dataset_hash(preset_dataset(preset.name, chat_template=template)) == wanted:
                return preset.name
    return None
