"""Sampling settings: the one set of defaults, each sequence's settings, and the log-probabilities
reported back. Tokens are drawn by llama.cpp's own sampler chain (runtime/sampler.py)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ggsteer.runtime.sampler import ChainOptions, TokenSampler


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings ggsteer's commands and server use when none are given: llama.cpp's own
    (llama-cli and llama-server), so an option means and defaults to what it does there."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


DEFAULTS = SamplingDefaults()
# greedy text for a human to compare (demo, eval samples): a base model's greedy text loops without a penalty
READABLE_GREEDY = replace(DEFAULTS, temperature=0.0, repeat_penalty=1.3)
MAX_TEMPERATURE = 2.0  # the highest temperature the CLI and the server accept (OpenAI's limit)
SAMPLING_OPTIONS = tuple(f.name for f in fields(SamplingDefaults))


@dataclass(frozen=True)
class SequenceSampling:
    """How one sequence of a batch is sampled and when it ends. A field left out switches its step
    off (greedy, no filter, no penalty); `SequenceSampling.with_defaults` starts from DEFAULTS."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: a random seed (llama.cpp's seeds are 32-bit: taken modulo 2**32)
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit; -inf bans it)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    grammar: str | None = None  # GBNF the generated text must follow (llama.cpp's grammar sampler)
    top_k: int = 0  # <= 0: off
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp's: positive logits divided by it, negative ones multiplied
    repeat_last_n: int = 64  # tokens (prompt included) the penalties look back over; 0 off, -1 the context

    def __post_init__(self):
        check_settings(self.max_tokens, self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty,
                       self.repeat_last_n, self.presence_penalty, self.frequency_penalty)

    @classmethod
    def with_defaults(cls, max_tokens: int, **settings) -> SequenceSampling:
        """DEFAULTS, overridden by `settings` (any field)."""
        return cls(max_tokens, **{**asdict(DEFAULTS), **settings})

    def chain_options(self) -> ChainOptions:
        return ChainOptions(self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty,
                            self.repeat_last_n, self.presence_penalty, self.frequency_penalty, self.logit_bias,
                            self.seed, self.grammar)

    def new_sampler(self, model, prompt: Sequence[int]) -> TokenSampler:
        """llama.cpp's sampler chain for this sequence, having seen its prompt (for the penalties)."""
        sampler = TokenSampler(model, self.chain_options(), model.n_ctx())
        sampler.accept_prompt(prompt)
        return sampler


def check_settings(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, presence, frequency):
    """ValueError naming the first setting out of range."""
    if int(max_tokens) < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    checks = [("temperature", temperature, temperature >= 0.0, ">= 0"),
              ("top_p", top_p, 0.0 < top_p <= 1.0, "in (0, 1]"),
              ("min_p", min_p, 0.0 <= min_p <= 1.0, "in [0, 1]"),
              ("repeat_penalty", repeat_penalty, repeat_penalty > 0.0, "> 0 (1 = off)"),
              ("presence_penalty", presence, True, "finite"), ("frequency_penalty", frequency, True, "finite")]
    for name, value, ok, rule in checks:
        if not (math.isfinite(value) and ok):
            raise ValueError(f"{name} must be {rule}, got {value}")
    for name, value in (("top_k", top_k), ("repeat_last_n", repeat_last_n)):
        if int(value) != value or value < -1:
            raise ValueError(f"{name} must be an integer >= -1, got {value}")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of the raw logits, before
    penalties, bias and temperature) and the `top` most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


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


def sequence_samplings(n: int, max_tokens, seed=None, stop=None, **settings) -> list[SequenceSampling]:
    """Per-sequence settings from values given once or per sequence; a single integer seed gives
    sequence i the seed `seed + i`. `settings`: SequenceSampling fields (temperature, top_k, ...)."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = [int(seed) + i for i in range(n)]
    if isinstance(stop, str):
        stop = [stop]
    columns = {name: per_sequence(name, value, n) for name, value in
               (("max_tokens", max_tokens), ("seed", seed), ("stop", stop), *settings.items())}
    samplings = []
    for i in range(n):
        row = {name: column[i] for name, column in columns.items()}
        row["stop"] = (row["stop"],) if isinstance(row["stop"], str) else tuple(row["stop"] or ())
        if int(row["max_tokens"]) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {row['max_tokens']} (sequence {i})")
        row["max_tokens"] = int(row["max_tokens"])
        try:
            samplings.append(SequenceSampling(**row))
        except ValueError as error:
            raise ValueError(f"sequence {i}: {error}") from None
    return samplings
