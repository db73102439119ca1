"""Behaviour on held-out prompts: the score of a prompt is log P(positive continuation) -
log P(negative continuation) (CAA-style, in nats); steering toward the positive side should raise
it. Its mean over held-out prompts as a function of strength is the behaviour curve; its slope
around 0 is the vector's steerability."""

from __future__ import annotations

from typing import Callable, Sequence

import llama_cpp
import numpy as np

from ggsteer.evaluate.settings import (
    SAMPLE_TOKENS,
    STEERABILITY_MIN_POINTS,
    STEERABILITY_WINDOW,
    Setting,
    settings_per_strength,
    under_each,
)
from ggsteer.model import SteeredModel
from ggsteer.runtime.batch import OwnedBatch
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
    """Sum of log P(continuation token | everything before) for each (prompt, continuation)."""
    encoded = [_pair_tokens(model, p, c) for p, c in items]
    scores = np.zeros(len(items))
    memory = llama_cpp.llama_get_memory(model.ctx)
    batch = OwnedBatch(model.n_batch)
    n_vocab = model.n_vocab()
    model.reset()
    try:
        start = 0
        while start < len(encoded):
            stop = _fill_batch(batch, encoded, start, model.n_batch, model.n_seq_max)
            llama_cpp.llama_memory_clear(memory, True)
            model.decode_batch(batch.batch)  # describes the rows to the hook, so hook interventions apply too
            row = 0
            for index in range(start, stop):
                tokens, n_prompt = encoded[index]
                row += n_prompt - 1
                for token in tokens[n_prompt:]:
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, row), shape=(n_vocab,))
                    scores[index] += _log_softmax_at(logits, token)
                    row += 1
                row += 1  # the last token predicts nothing we score
            start = stop
    finally:
        batch.close()
        llama_cpp.llama_memory_clear(memory, True)
        model.reset()
    return scores


def _fill_batch(batch: OwnedBatch, encoded, start: int, n_batch: int, n_seq_max: int) -> int:
    """Pack sequences from `start` on; logits only where a continuation token is predicted."""
    batch.clear()
    index = start
    while index < len(encoded) and index - start < n_seq_max:
        tokens, n_prompt = encoded[index]
        if len(tokens) > n_batch:
            raise ValueError(f"prompt and continuation {index} have {len(tokens)} tokens, more than n_batch={n_batch}")
        if batch.n_rows + len(tokens) > n_batch:
            break
        for pos, token in enumerate(tokens):
            batch.add(token, pos, index - start, n_prompt - 1 <= pos < len(tokens) - 1)
        index += 1
    return index


def behaviour_scores(model: SteeredModel, eval_items: Sequence[dict]) -> np.ndarray:
    """log P(positive) - log P(negative) per prompt, under the model's current controls."""
    pairs = [(item["prompt"], item["positive"]) for item in eval_items] + [(item["prompt"], item["negative"]) for item in eval_items]
    logprobs = continuation_logprobs(model, pairs)
    n = len(eval_items)
    return logprobs[:n] - logprobs[n:]


# -- behaviour against strength ---------------------------------------------------------------


def behaviour_curve(model: SteeredModel, vector: ControlVector, strengths: Sequence[float], eval_items: Sequence[dict],
                    *, layers: Sequence[int] | None = None, raw: bool = False) -> np.ndarray:
    """Behaviour scores [len(strengths), len(eval_items)] of `vector` at each strength."""
    settings = settings_per_strength(model, vector, strengths, layers, raw)
    return behaviour_per_setting(model, settings, eval_items)



def behaviour_per_setting(model, settings: Sequence[Setting], eval_items, tick: Callable[[], None] | None = None) -> np.ndarray:
    return np.array(under_each(settings, lambda: behaviour_scores(model, eval_items), tick))


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
    """A greedy completion under the current controls, for a human to read."""
    # greedy decoding of a base model loops without a repeat penalty (demo.py uses the same)
    return model.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.3)["choices"][0]["text"]
