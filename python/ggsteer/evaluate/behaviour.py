"""Behaviour on held-out prompts: the score of a prompt is log P(positive continuation) -
log P(negative continuation) (CAA-style, in nats); steering toward the positive side should raise
it. Its mean over held-out prompts as a function of strength is the behaviour curve; its slope
around 0 is the vector's steerability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from ggsteer.evaluate.settings import (
    SAMPLE_TOKENS,
    STEERABILITY_MIN_POINTS,
    STEERABILITY_WINDOW,
    settings_per_strength,
)
from ggsteer.evaluate.side_by_side import Settings, Unit, run_side_by_side
from ggsteer.generation import generate_batch
from ggsteer.model import SteeredModel
from ggsteer.sampling import READABLE_GREEDY
from ggsteer.vectors import ControlVector


def _pair_tokens(model: SteeredModel, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Tokens of prompt + continuation and how many belong to the prompt."""
    prompt_tokens = model.tokenize_prompt(prompt)
    full = model.tokenize_prompt(prompt + continuation)
    if full[: len(prompt_tokens)] != prompt_tokens:
        # the join merged across the boundary: score the continuation's own tokens instead
        full = prompt_tokens + model.tokenize(continuation.encode("utf-8"), add_bos=False, special=True)
    if len(full) == len(prompt_tokens):
        raise ValueError(f"continuation {continuation!r} has no tokens")
    return full, len(prompt_tokens)


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = logits.max()
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))


def continuation_logprobs(model: SteeredModel, items: Sequence[tuple[str, str]]) -> np.ndarray:
    """Sum of log P(continuation token | everything before) for each (prompt, continuation),
    under the model's current controls."""
    scores = np.zeros(len(items))
    units = []
    for index, (prompt, continuation) in enumerate(items):
        tokens, n_prompt = _pair_tokens(model, prompt, continuation)
        units.append(_scoring_unit(0, tokens[:n_prompt], [tokens[n_prompt:]], scores[None, None, :], index))
    run_side_by_side(model, [model.controls], units)
    return scores


def behaviour_units(model: SteeredModel, n_settings: int, eval_items: Sequence[dict]) -> tuple[list[Unit], np.ndarray]:
    """Units scoring each eval prompt under each setting, the prompt decoded once for both of its
    continuations (twice on a context of one sequence); and the array [n_settings, 2, n_items] of
    log-probabilities they fill."""
    logprobs = np.zeros((n_settings, 2, len(eval_items)))
    units = []
    for index, item in enumerate(eval_items):
        positive, n_prompt = _pair_tokens(model, item["prompt"], item["positive"])
        negative, n_negative = _pair_tokens(model, item["prompt"], item["negative"])
        assert positive[:n_prompt] == negative[:n_negative]  # both start with the prompt's own tokens
        continuations = [positive[n_prompt:], negative[n_prompt:]]
        for setting in range(n_settings):
            if model.n_seq_max >= 2:
                units.append(_scoring_unit(setting, positive[:n_prompt], continuations, logprobs, index))
            else:
                units += [_scoring_unit(setting, positive[:n_prompt], [c], logprobs, index, side)
                          for side, c in enumerate(continuations)]
    return units, logprobs


def behaviour_matrix(model: SteeredModel, settings: Settings, eval_items: Sequence[dict]) -> np.ndarray:
    """Behaviour scores [len(settings), len(eval_items)], every setting decoded side by side."""
    units, logprobs = behaviour_units(model, len(settings), eval_items)
    run_side_by_side(model, settings, units)
    return logprobs[:, 0] - logprobs[:, 1]


def _scoring_unit(setting: int, prompt: list[int], continuations: list[list[int]], out: np.ndarray, index: int,
                  first_side: int = 0) -> Unit:
    """A unit adding log P(continuation k | prompt) into out[setting, first_side + k, index]: the
    prompt's last row predicts each continuation's first token, a continuation's row k its token k + 1."""

    def consume(pieces: list[np.ndarray]) -> None:
        last_prompt_row = pieces[0][0]
        for k, tokens in enumerate(continuations):
            rows = pieces[1 + k]
            total = _log_softmax_at(last_prompt_row, tokens[0])
            for row, token in zip(rows, tokens[1:]):
                total += _log_softmax_at(row, token)
            out[setting, first_side + k, index] += total

    return Unit(setting, prompt, [len(prompt) - 1], consume, continuations, [range(len(c) - 1) for c in continuations])


def behaviour_scores(model: SteeredModel, eval_items: Sequence[dict]) -> np.ndarray:
    """log P(positive) - log P(negative) per prompt, under the model's current controls."""
    return behaviour_matrix(model, [model.controls], eval_items)[0]


# -- behaviour against strength ---------------------------------------------------------------


def behaviour_curve(model: SteeredModel, vector: ControlVector, strengths: Sequence[float], eval_items: Sequence[dict],
                    *, layers: Sequence[int] | None = None, raw: bool = False) -> np.ndarray:
    """Behaviour scores [len(strengths), len(eval_items)] of `vector` at each strength."""
    return behaviour_matrix(model, settings_per_strength(model, vector, strengths, layers, raw), eval_items)


def steerability(strengths: Sequence[float], mean_scores: Sequence[float]) -> float:
    """Slope of the mean behaviour score against strength around 0, in nats per unit strength.

    Least squares over the strengths within STEERABILITY_WINDOW (0.25) of 0, or over the three
    strengths nearest 0 when the window holds fewer. Include the unsteered score at 0.
    """
    s = np.asarray(strengths, dtype=np.float64)
    y = np.asarray(mean_scores, dtype=np.float64)
    near = np.flatnonzero(np.abs(s) <= STEERABILITY_WINDOW + 1e-9)
    if len(near) < STEERABILITY_MIN_POINTS:
        near = np.argsort(np.abs(s), kind="stable")[:STEERABILITY_MIN_POINTS]
    if np.ptp(s[near]) == 0:
        return float("nan")
    return float(np.polyfit(s[near], y[near], 1)[0])


def wrong_way_share(strength: float, scores: np.ndarray, baseline_scores: np.ndarray) -> float | None:
    """Share of prompts whose score moved against the push: below the unsteered score for a positive
    strength, above it for a negative one; None at strength 0."""
    if strength == 0:
        return None
    moved = np.asarray(scores) - np.asarray(baseline_scores)
    return float(np.mean(moved < 0 if strength > 0 else moved > 0))


def generation_sample(model: SteeredModel, prompt: str, max_tokens: int = SAMPLE_TOKENS) -> str:
    """A greedy completion under the current controls, for a human to read (the demo's settings and engine)."""
    return generation_samples(model, prompt, [model.controls], max_tokens)[0]


def generation_samples(model: SteeredModel, prompt: str, settings: Settings,
                       max_tokens: int = SAMPLE_TOKENS) -> list[str]:
    """A greedy completion of `prompt` under each setting (a list of interventions), decoded side by side."""
    texts: list[str] = []
    for start in range(0, len(settings), model.n_seq_max):
        chunk = list(settings[start : start + model.n_seq_max])
        texts += generate_batch(model, [prompt] * len(chunk), chunk, max_tokens, **asdict(READABLE_GREEDY))
    return texts
