"""Strength and layer sweeps: behaviour and fluency of one vector at a list of strengths on one layer
range (`strength_sweep`) or several (`layer_sweep`), and the ranges a layer sweep tries (`layer_windows`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ggsteer.evaluate.behaviour import (
    behaviour_units,
    generation_samples,
    steerability,
    wrong_way_share,
)
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.settings import settings_per_strength, steered_layers
from ggsteer.evaluate.side_by_side import run_side_by_side
from ggsteer.model import SteeredModel
from ggsteer.vectors import ControlVector, default_steering_layers

# -- sweeps -----------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    strength: float
    behaviour: float  # mean behaviour score over the eval prompts, nats
    gain: float  # behaviour minus the unsteered behaviour
    wrong_way: float | None  # share of prompts that moved against the push (None at strength 0)
    kl: float  # mean KL(unsteered || steered) per position of the neutral texts, nats
    perplexity: float  # of the neutral texts under steering
    sample: str | None = None


@dataclass
class Sweep:
    """Behaviour and fluency of one vector on one layer range at several strengths."""

    layers: list[int]
    baseline_behaviour: float
    baseline_perplexity: float
    steerability: float  # nats of behaviour per unit strength around 0
    points: list[SweepPoint] = field(default_factory=list)
    baseline_sample: str | None = None

    @property
    def label(self) -> str:
        return f"layers {format_layers(self.layers)}"

    def column(self, name: str) -> np.ndarray:
        return np.array([getattr(point, name) for point in self.points], dtype=np.float64)

    def to_dict(self) -> dict:
        return {"label": self.label, **asdict(self)}


def format_layers(layers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5,9"."""
    parts, start = [], None
    for i, il in enumerate(layers):
        start = il if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != il + 1:
            parts.append(f"{start}-{il}" if il != start else f"{il}")
            start = None
    return ",".join(parts)


def strength_sweep(
    model: SteeredModel,
    vector: ControlVector,
    strengths: Sequence[float],
    eval_items: Sequence[dict],
    *,
    layers: Sequence[int] | None = None,
    raw: bool = False,
    neutral_texts: Sequence[str] | None = None,
    samples: bool = False,
    progress: bool = False,
) -> Sweep:
    """Behaviour, wrong-way share, KL and perplexity of `vector` at each strength on one layer range.

    `layers` defaults to the vector's recommended layers; `samples` adds a greedy completion of
    the first eval prompt at each strength.
    """
    return layer_sweep(model, vector, strengths, eval_items, [layers], raw=raw, neutral_texts=neutral_texts,
                       samples=samples, progress=progress)[0]


def layer_sweep(
    model: SteeredModel,
    vector: ControlVector,
    strengths: Sequence[float],
    eval_items: Sequence[dict],
    layer_ranges: Sequence[Sequence[int] | None],
    *,
    raw: bool = False,
    neutral_texts: Sequence[str] | None = None,
    samples: bool = False,
    progress: bool = False,
) -> list[Sweep]:
    """A strength sweep on each layer range (None: the vector's recommended layers), every
    (range, strength) decoded side by side with the plain model, which is decoded once for all."""
    strengths = [float(s) for s in strengths]
    per_range = [settings_per_strength(model, vector, strengths, layers, raw) for layers in layer_ranges]
    chosen = [steered_layers(model, vector, layers, raw) for layers in layer_ranges]
    # setting 0 is the plain model; range r's strength k is setting 1 + r * len(strengths) + k
    settings = [[], *(items for block in per_range for items in block)]
    fluency = FluencyTally(neutral_tokens(model, neutral_texts), len(settings) - 1)
    units, logprobs = behaviour_units(model, len(settings), eval_items)
    label = f"layers {format_layers(chosen[0])}" if len(chosen) == 1 else f"{len(chosen)} layer ranges"
    with tqdm(total=0, desc=label, unit="decode", disable=not progress) as bar:
        run_side_by_side(model, settings, fluency.units + units, tick=bar.update, on_plan=_grow(bar))
        texts = _samples(model, settings, eval_items[0]["prompt"], bar) if samples else [None] * len(settings)
    scores = logprobs[:, 0] - logprobs[:, 1]
    costs, plain = fluency.costs()
    sweeps = []
    for r, layers in enumerate(chosen):
        block = slice(1 + r * len(strengths), 1 + (r + 1) * len(strengths))
        sweeps.append(_sweep(layers, strengths, scores[0], scores[block], costs[block.start - 1 : block.stop - 1],
                             plain.perplexity, texts[block], texts[0]))
    return sweeps


def _sweep(layers, strengths, baseline, scores, costs, plain_perplexity, texts, baseline_text) -> Sweep:
    means = scores.mean(axis=1)
    points = [
        SweepPoint(s, float(m), float(m - baseline.mean()), wrong_way_share(s, row, baseline), cost.kl,
                   cost.perplexity, text)
        for s, m, row, cost, text in zip(strengths, means, scores, costs, texts)
    ]
    with_zero = (strengths, means) if 0.0 in strengths else ([*strengths, 0.0], [*means, baseline.mean()])
    return Sweep(layers, float(baseline.mean()), plain_perplexity, steerability(*with_zero), points, baseline_text)


def _grow(bar):
    def on_plan(n_decodes: int) -> None:
        bar.total += n_decodes
        bar.refresh()

    return on_plan


def _samples(model, settings, prompt: str, bar) -> list[str]:
    """A greedy sample under each setting, every setting decoded side by side."""
    _grow(bar)(len(settings))
    texts = generation_samples(model, prompt, settings)
    bar.update(len(settings))
    return texts


def layer_windows(vector: ControlVector, n_layer: int, n_windows: int = 3) -> list[list[int]]:
    """Layer ranges for a layer sweep: the vector's recommended layers, then `n_windows` equal
    consecutive windows over every steerable layer of the vector (Gemma 3 270M, 18 layers:
    3-14, then 1-6, 7-12, 13-17)."""
    steerable = [il for il in vector.layers if 1 <= il < n_layer]
    if not steerable:
        raise ValueError(f"the vector has no layer this model can steer "
                         f"(it has {vector.layers}, the model 1..{n_layer - 1})")
    recommended = [il for il in (vector.recommended_layers or default_steering_layers(n_layer)) if il in steerable]
    windows = [recommended or steerable]
    for chunk in np.array_split(np.array(steerable), min(n_windows, len(steerable))):
        window = [int(il) for il in chunk]
        if window not in windows:
            windows.append(window)
    return windows
