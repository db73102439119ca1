"""Measure steering: behaviour on held-out prompts, fluency cost on neutral text, sweeps over
strengths and layer ranges, calibration, and plots (plot.py needs the optional [plot] extra)."""

from ggsteer.evaluate.behaviour import (
    behaviour_curve,
    behaviour_matrix,
    behaviour_scores,
    continuation_logprobs,
    generation_sample,
    steerability,
    wrong_way_share,
)
from ggsteer.evaluate.calibration import (
    CALIBRATE_STRENGTHS,
    DEFAULT_MAX_KL,
    EVAL_STRENGTHS,
    Calibration,
    calibrated_vector,
    choose_calibration,
    infer_preset,
)
from ggsteer.evaluate.fluency import (
    FluencyCost,
    fluency_cost,
    fluency_sweep,
    load_neutral_texts,
    unsteered_perplexity,
)
from ggsteer.evaluate.settings import steered_layers
from ggsteer.evaluate.sweeps import (
    Sweep,
    SweepPoint,
    format_layers,
    layer_sweep,
    layer_windows,
    strength_sweep,
)

__all__ = [
    "CALIBRATE_STRENGTHS",
    "DEFAULT_MAX_KL",
    "EVAL_STRENGTHS",
    "Calibration",
    "FluencyCost",
    "Sweep",
    "SweepPoint",
    "behaviour_curve",
    "behaviour_matrix",
    "behaviour_scores",
    "calibrated_vector",
    "choose_calibration",
    "continuation_logprobs",
    "fluency_cost",
    "fluency_sweep",
    "format_layers",
    "generation_sample",
    "infer_preset",
    "layer_sweep",
    "layer_windows",
    "load_neutral_texts",
    "steerability",
    "steered_layers",
    "strength_sweep",
    "unsteered_perplexity",
    "wrong_way_share",
]
