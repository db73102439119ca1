"""The ablation view of a vector: what projecting it out costs, and how much of the behaviour survives.

For `ablate` (or `clamp` at a strength) on a layer range:
- fluency cost on the shipped neutral texts (KL against the plain model, perplexity), as
  `evaluate.fluency_cost` measures it;
- behaviour on prompts that ask for it (the preset's positive persona instruction before each eval
  prompt), unsteered and under the op, next to the plain eval prompts unsteered. `recovery` is the
  share of the persona's push that the op takes back: (asking - ablated) / (asking - neutral); 1
  means back at the neutral prompts' score, >= 0.5 is the bar of issue 16. None when the persona
  instruction does not raise the score on this model (nothing to take back);
- spread: per ablated layer, the std of those prompts' projections (sink rows left out) unsteered
  over the std under the op, along the direction the op acts on and along the raw trained
  direction (the latter keeps the parts every token shares, so it shrinks far less).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ggsteer.evaluate.behaviour import behaviour_scores, generation_sample
from ggsteer.evaluate.fluency import fluency_cost, unsteered_perplexity
from ggsteer.evaluate.settings import steered_layers
from ggsteer.model import SteeredModel
from ggsteer.train import get_preset
from ggsteer.vectors import ControlVector
from ggsteer.vectors.projection import SINK_POSITIONS, projection_for_layer

# a persona instruction must raise the mean score by this much (nats) for recovery to mean anything
MIN_PERSONA_PUSH = 0.1


@dataclass
class AblationView:
    op: str
    strength: float
    layers: list[int]
    kl: float
    perplexity: float
    baseline_perplexity: float
    neutral_behaviour: float  # plain eval prompts, unsteered
    asking_behaviour: float  # prompts asking for the behaviour, unsteered
    ablated_behaviour: float  # prompts asking for the behaviour, under the op
    recovery: float | None
    spread_shrink: dict[int, float]  # per layer, along the direction the op acts on
    raw_spread_shrink: dict[int, float]  # per layer, along the trained direction
    sample: str | None = None
    baseline_sample: str | None = None

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.baseline_perplexity

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}


def asking_items(preset_name: str, items: Sequence[dict]) -> list[dict]:
    """The eval items with the preset's first positive persona instruction before each prompt."""
    preset = get_preset(preset_name)
    instruction = preset.template.format(persona=preset.positive_personas[0])
    return [{**item, "prompt": f"{instruction} {item['prompt']}"} for item in items]


def ablation_view(
    model: SteeredModel,
    vector: ControlVector,
    eval_items: Sequence[dict],
    asking: Sequence[dict],
    *,
    op: str = "ablate",
    strength: float = 0.0,
    layers: Sequence[int] | None = None,
    neutral_texts: Sequence[str] | None = None,
    sample_prompt: str | None = None,
    skip_first: int | None = None,
) -> AblationView:
    """Measure `op` (ablate, or clamp at `strength`) of `vector` on `layers` (default: recommended)."""
    if op not in ("ablate", "clamp"):
        raise ValueError(f"the ablation view is for ablate and clamp, got {op!r}")
    options = dict(op=op, layers=layers, skip_first=skip_first)
    with model.unsteered():
        neutral = float(behaviour_scores(model, eval_items).mean())
        asked = float(behaviour_scores(model, asking).mean())
        plain_states = _states(model, asking, layers, vector)
        baseline_sample = generation_sample(model, sample_prompt) if sample_prompt else None
    with model.steer(vector, strength, **options):
        chosen = list(model.controls[0].layers)
        cost = fluency_cost(model, neutral_texts)
        ablated = float(behaviour_scores(model, asking).mean())
        steered_states = _states(model, asking, chosen, vector)
        sample = generation_sample(model, sample_prompt) if sample_prompt else None
    push = asked - neutral
    recovery = (asked - ablated) / push if push >= MIN_PERSONA_PUSH else None
    shrink, raw_shrink = {}, {}
    for k, il in enumerate(chosen):
        direction, _ = projection_for_layer(vector, il, op, strength)
        raw = vector.directions[il] / np.linalg.norm(vector.directions[il])
        shrink[il] = _spread(plain_states, k, direction) / max(_spread(steered_states, k, direction), 1e-30)
        raw_shrink[il] = _spread(plain_states, k, raw) / max(_spread(steered_states, k, raw), 1e-30)
    return AblationView(op, float(strength), chosen, cost.kl, cost.perplexity, unsteered_perplexity(model, neutral_texts),
                        neutral, asked, ablated, recovery, shrink, raw_shrink, sample, baseline_sample)


def _states(model, asking, layers, vector) -> list[np.ndarray]:
    chosen = steered_layers(model, vector, layers) if layers is None else list(layers)
    # the hook edits a block's output before the capture copies it: these are the states the next block reads
    return model.hidden_states([item["prompt"] for item in asking], layers=chosen, pool="all")


def _spread(states: list[np.ndarray], k: int, direction: np.ndarray) -> float:
    projections = np.concatenate([s[SINK_POSITIONS:, k].astype(np.float64) @ direction.astype(np.float64) for s in states])
    return float(projections.std())
