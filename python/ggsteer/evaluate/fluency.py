"""Fluency cost of steering, measured on the shipped neutral texts (`load_neutral_texts`).
- KL(unsteered || steered): at every position of every text, the KL divergence of the steered
  next-token distribution Q from the unsteered one P, sum_v P(v) (log P(v) - log Q(v)), in nats,
  averaged over all positions (the last position of a text included). It weighs the tokens the
  plain model expects, so it grows when steering takes probability away from ordinary text.
- Perplexity: exp of the mean negative log-likelihood, under steering, of every text token after
  the first (token-weighted over all texts).
Log-softmax is computed in float64 from llama.cpp's float32 logits, one row at a time, so only one
decode's logits are held (Gemma 3's vocabulary has 262,144 entries: 1 MiB of float32 per row).
Texts are decoded side by side (at most LOGITS_BUDGET_BYTES of logits per decode); each batch's
unsteered logits are decoded once and compared with every strength of a sweep. Decodes go through
`SteeredModel.decode_batch`, so hook interventions (ablate, clamp, ...) are measured too.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import llama_cpp
import numpy as np

from ggsteer.evaluate.settings import Setting, settings_per_strength, under_each
from ggsteer.model import SteeredModel
from ggsteer.runtime.batch import OwnedBatch
from ggsteer.vectors import ControlVector

NEUTRAL_TEXT_FILE = "neutral_text.json"
# Logit rows decoded at once for fluency: 128 MiB of float32 logits (128 rows of Gemma 3's vocabulary)
LOGITS_BUDGET_BYTES = 128 * 2**20

# -- neutral text ---------------------------------------------------------------------------


def load_neutral_texts() -> list[str]:
    """The shipped neutral passages (plain factual English) that fluency is measured on."""
    text = resources.files("ggsteer.data").joinpath(NEUTRAL_TEXT_FILE).read_text(encoding="utf-8")
    texts = json.loads(text)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{NEUTRAL_TEXT_FILE}: expected a non-empty JSON list of non-empty strings")
    return texts


# -- fluency --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FluencyCost:
    """What one steering setting costs on neutral text."""

    kl: float  # mean KL(unsteered || steered) over every position, nats
    perplexity: float  # of the neutral texts under the setting
    n_positions: int  # positions the KL is averaged over


@dataclass(frozen=True)
class _NeutralPlan:
    """Tokenized neutral texts and how they are packed into decodes."""

    token_lists: list[list[int]]
    groups: list[list[int]]  # text indices decoded together


def fluency_cost(model: SteeredModel, texts: Sequence[str] | None = None) -> FluencyCost:
    """KL(unsteered || current controls) and perplexity under the current controls (default texts: the shipped neutral ones)."""
    costs, _ = fluency_costs(model, plan_neutral(model, texts), [contextlib.nullcontext])
    return costs[0]


def fluency_sweep(
    model: SteeredModel,
    vector: ControlVector,
    strengths: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    raw: bool = False,
    texts: Sequence[str] | None = None,
) -> list[FluencyCost]:
    """Fluency cost of `vector` at each strength; the unsteered reference is decoded once per batch."""
    settings = settings_per_strength(model, vector, strengths, layers, raw)
    costs, _ = fluency_costs(model, plan_neutral(model, texts), settings)
    return costs


def unsteered_perplexity(model: SteeredModel, texts: Sequence[str] | None = None) -> float:
    """Perplexity of the neutral texts under the plain model."""
    _, plain = fluency_costs(model, plan_neutral(model, texts), [])
    return plain.perplexity


def plan_neutral(model: SteeredModel, texts: Sequence[str] | None) -> _NeutralPlan:
    texts = load_neutral_texts() if texts is None else list(texts)
    if not texts:
        raise ValueError("no neutral texts to measure fluency on")
    token_lists = [model.tokenize_prompt(text) for text in texts]
    for text, tokens in zip(texts, token_lists):
        if len(tokens) < 2:
            raise ValueError(f"neutral text {text!r} has fewer than 2 tokens: nothing to predict")
        if len(tokens) > model.n_batch:
            raise ValueError(f"neutral text {text[:40]!r}... has {len(tokens)} tokens, more than n_batch={model.n_batch}")
    max_rows = min(model.n_batch, max(1, LOGITS_BUDGET_BYTES // (4 * model.n_vocab())))
    return _NeutralPlan(token_lists, _pack_rows(token_lists, max_rows, model.n_seq_max))


def _pack_rows(token_lists: list[list[int]], max_rows: int, max_sequences: int) -> list[list[int]]:
    """Consecutive texts per decode, at most `max_rows` logit rows (a longer text goes alone)."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for index, tokens in enumerate(token_lists):
        if current and (rows + len(tokens) > max_rows or len(current) == max_sequences):
            groups.append(current)
            current, rows = [], 0
        current.append(index)
        rows += len(tokens)
    groups.append(current)
    return groups


def fluency_costs(
    model: SteeredModel,
    plan: _NeutralPlan,
    settings: Sequence[Setting],
    tick: Callable[[], None] | None = None,
) -> tuple[list[FluencyCost], FluencyCost]:
    """FluencyCost per setting and the unsteered model's own cost.

    Batches outside, settings inside: each batch's unsteered logits are decoded once and kept
    only while the settings are compared with them.
    """
    kl_sums = np.zeros(len(settings))
    nll_sums = np.zeros(len(settings))
    plain_nll = 0.0
    decoder = _AllPositionsDecoder(model)
    try:
        for group in plan.groups:
            targets = _next_tokens(plan.token_lists, group)
            with model.unsteered():
                reference = decoder.decode(plan.token_lists, group).copy()
            reference_lse = np.array([_logsumexp(row) for row in reference])
            plain_nll -= sum(reference[r, t] - reference_lse[r] for r, t in enumerate(targets) if t >= 0)
            compared = under_each(
                settings, lambda: _compare_rows(reference, reference_lse, decoder.decode(plan.token_lists, group), targets), tick
            )
            kl_sums += [kl for kl, _ in compared]
            nll_sums += [nll for _, nll in compared]
    finally:
        decoder.close()
    n_positions = sum(len(tokens) for tokens in plan.token_lists)
    n_predicted = n_positions - len(plan.token_lists)
    costs = [FluencyCost(float(kl / n_positions), math.exp(nll / n_predicted), n_positions) for kl, nll in zip(kl_sums, nll_sums)]
    return costs, FluencyCost(0.0, math.exp(plain_nll / n_predicted), n_positions)


def _next_tokens(token_lists: list[list[int]], group: list[int]) -> list[int]:
    """For each logit row of the group, the token that follows it in its text (-1 after the last)."""
    return [t for index in group for t in [*token_lists[index][1:], -1]]


def _logsumexp(row: np.ndarray) -> float:
    row = row.astype(np.float64)
    top = row.max()
    return float(top + np.log(np.exp(row - top).sum()))


def _compare_rows(
    reference: np.ndarray, reference_lse: np.ndarray, steered: np.ndarray, targets: list[int]
) -> tuple[float, float]:
    """Summed KL(reference || steered) over the rows, and the steered NLL of each row's target."""
    kl = nll = 0.0
    for r, target in enumerate(targets):
        log_p = reference[r].astype(np.float64) - reference_lse[r]
        log_q = steered[r].astype(np.float64) - _logsumexp(steered[r])
        # identical logits give log_p == log_q exactly, so strength 0 costs exactly 0
        kl += float(np.dot(np.exp(log_p), log_p - log_q))
        if target >= 0:
            nll -= float(log_q[target])
    return kl, nll


class _AllPositionsDecoder:
    """Decodes whole texts side by side with logits at every position."""

    def __init__(self, model: SteeredModel):
        self.model = model
        self.memory = llama_cpp.llama_get_memory(model.ctx)
        self.batch = OwnedBatch(model.n_batch)
        self.n_vocab = model.n_vocab()

    def decode(self, token_lists: list[list[int]], group: list[int]) -> np.ndarray:
        """float32 logits [rows, n_vocab] in batch order: a view valid until the next decode."""
        self.batch.clear()
        for seq, index in enumerate(group):
            for pos, token in enumerate(token_lists[index]):
                self.batch.add(token, pos, seq, True)
        n_rows = self.batch.n_rows
        llama_cpp.llama_memory_clear(self.memory, True)
        self.model.decode_batch(self.batch.batch)
        # llama.h: the requested logits are stored contiguously in batch order
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.model.ctx), shape=(n_rows, self.n_vocab))

    def close(self) -> None:
        self.batch.close()
        llama_cpp.llama_memory_clear(self.memory, True)
        self.model.reset()
