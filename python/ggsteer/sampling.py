"""Sampling one sequence's next token: settings, penalties and bias, temperature and top-p, and the
log-probabilities reported back."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_TEMPERATURE = 2.0  # the highest temperature the CLI and the server accept (OpenAI's limit)


@dataclass(frozen=True)
class SequenceSampling:
    """How one sequence of a batch is sampled and when it ends."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's penalties over the tokens generated so far: logit -= frequency * count + presence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    grammar: str | None = None  # GBNF the generated text must follow (llama.cpp's grammar sampler)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of the raw logits, before
    penalties, bias and temperature) and the `top` most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


def adjusted_logits(logits: np.ndarray, sampling: SequenceSampling, generated: Sequence[int]) -> np.ndarray:
    """The logits after OpenAI's presence/frequency penalties (over `generated`) and logit_bias."""
    penalize = bool(generated) and (sampling.presence_penalty or sampling.frequency_penalty)
    if not penalize and not sampling.logit_bias:
        return logits
    adjusted = logits.astype(np.float64)
    if penalize:
        tokens, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        adjusted[tokens] -= sampling.frequency_penalty * counts + sampling.presence_penalty
    for token, bias in sampling.logit_bias:
        adjusted[token] += bias
    return adjusted


def token_logprob(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` and the `n_top` most likely tokens (ties: lower id first)."""
    scaled = logits.astype(np.float64)
    log_probs = scaled - scaled.max()
    log_probs -= np.log(np.exp(log_probs).sum())
    top = np.argsort(-log_probs, kind="stable")[:n_top]
    return TokenLogprob(int(token), float(log_probs[token]), tuple((int(t), float(log_probs[t])) for t in top))


def per_sequence(name: str, value, n: int) -> list:
    """A setting given once for every sequence, or as a list with one entry per sequence."""
    if isinstance(value, (list, tuple)) and not (name == "stop" and all(isinstance(v, str) for v in value)):
        if len(value) != n:
            raise ValueError(f"{n} prompts but {len(value)} values of {name}")
        return list(value)
    return [value] * n


def sequence_samplings(n: int, max_tokens, temperature, top_p, seed, stop) -> list[SequenceSampling]:
    """Per-sequence settings; a single integer seed gives sequence i the seed `seed + i`."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = [int(seed) + i for i in range(n)]
    if isinstance(stop, str):
        stop = [stop]
    columns = [per_sequence(name, value, n) for name, value in
               (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed), ("stop", stop))]
    samplings = []
    for i, (count, temp, p, s, words) in enumerate(zip(*columns)):
        if int(count) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {count} (sequence {i})")
        if not 0.0 < float(p) <= 1.0 or float(temp) < 0.0:
            raise ValueError(f"sequence {i}: temperature must be >= 0 and top_p in (0, 1], got {temp} and {p}")
        words = (words,) if isinstance(words, str) else tuple(words or ())
        samplings.append(SequenceSampling(int(count), float(temp), float(p), s, words))
    return samplings
