"""The ablation view of a vector: what projecting it out costs, and how much of the behaviour survives.

For `ablate` (or `clamp` at a strength) on a layer range:
- fluency cost on the shipped neutral texts (KL against the plain model, perplexity), as
  `evaluate.fluency_cost` measures it;
- behaviour on prompts that ask for it (the preset's positive persona instruction before each eval
  prompt), unsteered and under the op, next to the plain eval prompts unsteered. `recovery` is the
  share of the persona's push that the op takes back: (asking - ablated) / (asking - neutral); 1
  means back at the neutral prompts' score, >= 0.5 is the bar of issue 16. None when the persona
  instruction does not move the score on this model (nothing to take back). Every persona of the
  preset is asked, each before every eval prompt;
- the same for prompts that ask for the opposite (the preset's negative personas): an ablated
  direction is gone for both sides. Where the eval prompts already score high (calm and honest on
  Gemma 3 270M), the positive personas add little and only the negative ones push;
- gap left: what survives of the difference between asking for the behaviour and asking for its
  opposite, (ablated - opposite ablated) / (asking - opposite). 0 means the persona no longer matters
  along this behaviour; unlike recovery it does not depend on where the op puts the plain eval
  prompts (their score under the op is reported too: an op that erases the behaviour moves them as
  well, to wherever its target sits);
- spread: per ablated layer, the std of those prompts' projections (sink rows left out) unsteered
  over the std under the op, along the direction the op acts on and along the raw trained
  direction (the latter keeps the parts every token shares, so it shrinks far less).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ggsteer.evaluate.behaviour import behaviour_scores, generation_sample
from ggsteer.evaluate.fluency import fluency_costs, neutral_tokens
from ggsteer.evaluate.settings import steered_layers
from ggsteer.model import SteeredModel
from ggsteer.train import get_preset
from ggsteer.vectors import ControlVector
from ggsteer.vectors.projection import SINK_POSITIONS, projection_for_layer

# a persona instruction must move the mean score by this much (nats) for recovery to mean anything
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
    neutral_ablated: float  # plain eval prompts, under the op
    asking_behaviour: float  # prompts asking for the behaviour, unsteered
    ablated_behaviour: float  # prompts asking for the behaviour, under the op
    recovery: float | None
    opposite_behaviour: float | None  # prompts asking for the opposite, unsteered
    opposite_ablated: float | None  # prompts asking for the opposite, under the op
    opposite_recovery: float | None
    # (ablated - opposite_ablated) / (asking - opposite): what survives of the personas' difference
    gap_left: float | None
    spread_shrink: dict[int, float]  # per layer, along the direction the op acts on
    raw_spread_shrink: dict[int, float]  # per layer, along the trained direction
    sample: str | None = None
    baseline_sample: str | None = None

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.baseline_perplexity

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_ratio": self.perplexity_ratio}


def asking_items(preset_name: str, items: Sequence[dict], side: str = "positive") -> list[dict]:
    """The eval items behind each of the preset's positive (or negative) persona instructions, persona
    by persona (one phrasing alone moved the mean by as little as the noise between phrasings)."""
    if side not in ("positive", "negative"):
        raise ValueError(f"side must be 'positive' or 'negative', got {side!r}")
    preset = get_preset(preset_name)
    personas = preset.positive_personas if side == "positive" else preset.negative_personas
    instructions = [preset.template.format(persona=persona) for persona in personas]
    return [{**item, "prompt": f"{instruction} {item['prompt']}"} for instruction in instructions for item in items]


def ablation_view(
    model: SteeredModel,
    vector: ControlVector,
    eval_items: Sequence[dict],
    asking: Sequence[dict],
    *,
    opposite: Sequence[dict] | None = None,
    op: str = "ablate",
    strength: float = 0.0,
    layers: Sequence[int] | None = None,
    neutral_texts: Sequence[str] | None = None,
    sample_prompt: str | None = None,
    skip_first: int | None = None,
) -> AblationView:
    """Measure `op` (ablate, or clamp at `strength`) of `vector` on `layers` (default: recommended);
    `asking` and `opposite` are the eval items asking for the behaviour and for its opposite."""
    if op not in ("ablate", "clamp"):
        raise ValueError(f"the ablation view is for ablate and clamp, got {op!r}")
    options = dict(op=op, layers=layers, skip_first=skip_first)
    with model.unsteered():
        neutral, asked, opposed = _mean_scores(model, eval_items, asking, opposite)
        plain_states = _states(model, asking, layers, vector)
        baseline_sample = generation_sample(model, sample_prompt) if sample_prompt else None
    with model.steer(vector, strength, **options):
        chosen = list(model.controls[0].layers)
        # the plain model's perplexity comes from the decode KL is measured against
        (cost,), plain = fluency_costs(model, neutral_tokens(model, neutral_texts), [model.controls])
        neutral_ablated, ablated, opposed_ablated = _mean_scores(model, eval_items, asking, opposite)
        steered_states = _states(model, asking, chosen, vector)
        sample = generation_sample(model, sample_prompt) if sample_prompt else None
    shrink, raw_shrink = {}, {}
    for k, il in enumerate(chosen):
        direction, _ = projection_for_layer(vector, il, op, strength)
        raw = vector.directions[il] / np.linalg.norm(vector.directions[il])
        shrink[il] = _spread(plain_states, k, direction) / max(_spread(steered_states, k, direction), 1e-30)
        raw_shrink[il] = _spread(plain_states, k, raw) / max(_spread(steered_states, k, raw), 1e-30)
    return AblationView(op, float(strength), chosen, cost.kl, cost.perplexity, plain.perplexity,
                        neutral, neutral_ablated, asked, ablated, _recovery(neutral, asked, ablated),
                        opposed, opposed_ablated, _recovery(neutral, opposed, opposed_ablated),
                        _gap_left(asked, opposed, ablated, opposed_ablated),
                        shrink, raw_shrink, sample, baseline_sample)


def _mean_scores(model, plain, asking, opposite) -> tuple[float, float, float | None]:
    """Mean score of the plain eval prompts, of those asking for the behaviour and of those asking
    for its opposite (None without them), scored in one run."""
    groups = [list(plain), list(asking), list(opposite or [])]
    scores = behaviour_scores(model, [item for group in groups for item in group])
    means = [float(part.mean()) if len(part) else None
             for part in np.split(scores, np.cumsum([len(group) for group in groups])[:-1])]
    return means[0], means[1], means[2]


def _recovery(neutral: float, asked: float | None, ablated: float | None) -> float | None:
    """Share of the persona's push (either sign) taken back; None without a push to take back."""
    if asked is None or ablated is None or abs(asked - neutral) < MIN_PERSONA_PUSH:
        return None
    return (asked - ablated) / (asked - neutral)


def _gap_left(asked: float, opposed: float | None, ablated: float, opposed_ablated: float | None) -> float | None:
    """Share of the difference between asking for the behaviour and for its opposite that survives the op."""
    if opposed is None or opposed_ablated is None or abs(asked - opposed) < MIN_PERSONA_PUSH:
        return None
    return (ablated - opposed_ablated) / (asked - opposed)


def _states(model, asking, layers, vector) -> list[np.ndarray]:
    chosen = steered_layers(model, vector, layers) if layers is None else list(layers)
    # the hook edits a block's output before the capture copies it: these are the states the next block reads
    return model.hidden_states([item["prompt"] for item in asking], layers=chosen, pool="all")


def _spread(states: list[np.ndarray], k: int, direction: np.ndarray) -> float:
    projections = np.concatenate([s[SINK_POSITIONS:, k].astype(np.float64) @ direction.astype(np.float64)
                                  for s in states])
    return float(projections.std())
