"""The result of a tune, measured on the report prompts (never searched on): the default and the
chosen settings compared at equal KL.

The default is measured at its calibrated strength, whose KL may sit well below the budget while
the chosen settings use all of it. So it is measured again with its strength scaled until its KL on
the neutral texts equals the chosen settings' KL (within MATCH_TOLERANCE): a secant on log KL
against log strength through the nearest measured strengths, as calibration's search predicts its
boundary (evaluate/strength_search.py). The ratio tuned / default is taken at that equal KL, so it
compares the settings, not how much of the budget each one uses; the ratio against the calibrated
strength is kept beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from ggsteer.evaluate.calibration import power_law_strength

# relative KL difference accepted as equal, and the most extra passes spent reaching it
MATCH_TOLERANCE = 0.03
MATCH_ROUNDS = 4
# resamples of the report prompts for the spread of the tuned / default ratio
BOOTSTRAP_ROUNDS = 2000

# settings -> (moves [len(settings), n_prompts], KL per setting), on the report prompts
Measure = Callable[[Sequence], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Report:
    """The default (calibrated and at the tuned KL) and the chosen settings on the report prompts."""

    default_moves: list[float]  # per report prompt, at the calibrated strength: behaviour minus the plain model's
    tuned_moves: list[float]
    default_kl: float
    tuned_kl: float
    matched_strength: float  # the default's strength whose KL equals the tuned KL (the calibrated one if unmatched)
    matched_moves: list[float]
    matched_kl: float
    ratio: float  # mean tuned move / mean matched default move (nan when the default does not move)
    ratio_spread: tuple[float, float]  # 10th and 90th percentile of the ratio over resampled prompts
    calibrated_ratio: float  # mean tuned move / mean default move at its calibrated strength

    @property
    def default_move(self) -> float:
        return float(np.mean(self.default_moves))

    @property
    def tuned_move(self) -> float:
        return float(np.mean(self.tuned_moves))

    @property
    def matched_move(self) -> float:
        return float(np.mean(self.matched_moves))


def report(measure: Measure, default, chosen, seed: int) -> Report:
    """Measure the default and the chosen settings, then the default at the chosen settings' KL."""
    moves, kls = measure([default, chosen])
    target = float(kls[1])
    points = [(default.strength, float(kls[0]), moves[0])]
    for _ in range(MATCH_ROUNDS):
        if _matched(_closest(points, target)[1], target):
            break
        strength = next_strength(points, target)
        if strength is None or any(strength == p[0] for p in points):
            break
        more, more_kls = measure([replace(default, strength=strength)])
        points.append((strength, float(more_kls[0]), more[0]))
    strength, matched_kl, matched = _closest(points, target)
    ratio, spread = ratio_and_spread(matched, moves[1], seed)
    calibrated = mean_ratio(moves[0], moves[1])
    return Report(_floats(moves[0]), _floats(moves[1]), float(kls[0]), target, float(strength), _floats(matched),
                  matched_kl, ratio, spread, calibrated)


def _matched(kl: float, target: float) -> bool:
    return abs(kl - target) <= MATCH_TOLERANCE * target


def _closest(points, target: float):
    return min(points, key=lambda p: abs(p[1] - target))


def next_strength(points: Sequence[tuple], target: float) -> float | None:
    """The strength whose KL should equal `target`, from the two measured strengths nearest it on log
    KL (KL ~ strength squared from one point); None when no KL is positive."""
    usable = sorted((p for p in points if p[1] > 0 and p[0] > 0), key=lambda p: abs(math.log(p[1] / target)))
    if not usable or target <= 0:
        return None
    first = usable[0][:2]
    second = next((p[:2] for p in usable[1:] if p[0] != first[0] and p[1] != first[1]), None)
    return round(power_law_strength(first, second, target), 4)


def mean_ratio(base, tuned) -> float:
    """mean(tuned) / mean(base), nan when the base does not move."""
    base_mean = float(np.mean(np.asarray(base, dtype=np.float64)))
    return float(np.mean(np.asarray(tuned, dtype=np.float64)) / base_mean) if base_mean != 0 else math.nan


def ratio_and_spread(base: np.ndarray, tuned: np.ndarray, seed: int) -> tuple[float, tuple[float, float]]:
    """mean(tuned) / mean(base), and its 10th-90th percentile over prompts resampled with replacement."""
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(base), size=(BOOTSTRAP_ROUNDS, len(base)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = tuned[picks].mean(axis=1) / base[picks].mean(axis=1)
    ratio = mean_ratio(base, tuned)
    finite = ratios[np.isfinite(ratios)]
    if not finite.size:
        return ratio, (math.nan, math.nan)
    return ratio, (float(np.percentile(finite, 10)), float(np.percentile(finite, 90)))


def _floats(values) -> list[float]:
    return [float(v) for v in values]
