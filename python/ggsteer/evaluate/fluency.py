"""Fluency cost of steering, measured on the shipped neutral texts (`load_neutral_texts`).
- KL(unsteered || steered): at every position of every text, the KL divergence of the steered
  next-token distribution Q from the unsteered one P, sum_v P(v) (log P(v) - log Q(v)), in nats,
  averaged over all positions (the last position of a text included). It weighs the tokens the
  plain model expects, so it grows when steering takes probability away from ordinary text.
- Perplexity: exp of the mean negative log-likelihood, under steering, of every text token after
  the first (token-weighted over all texts).
Normalisers (log-sum-exp) sum float32 exponentials in float64. Every (text, setting) pair is a unit
decoded side by side (evaluate/side_by_side.py, at most LOGITS_BUDGET_BYTES of logits per decode),
text by text: a text's plain logits are decoded once, next to its steered versions, and held only
until they have been compared (Gemma 3's vocabulary has 262,144 entries: 1 MiB of float32 per row).
Hook interventions (ablate, clamp, ...) are measured like additions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import numpy as np

from ggsteer.evaluate.settings import settings_per_strength
from ggsteer.evaluate.side_by_side import Settings, Unit, run_side_by_side
from ggsteer.model import SteeredModel
from ggsteer.vectors import ControlVector

NEUTRAL_TEXT_FILE = "neutral_text.json"

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


def fluency_cost(model: SteeredModel, texts: Sequence[str] | None = None) -> FluencyCost:
    """KL(unsteered || current controls) and perplexity under the current controls (default texts: the
    shipped neutral ones)."""
    costs, _ = fluency_costs(model, neutral_tokens(model, texts), [model.controls])
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
    """Fluency cost of `vector` at each strength, every strength decoded side by side."""
    settings = settings_per_strength(model, vector, strengths, layers, raw)
    costs, _ = fluency_costs(model, neutral_tokens(model, texts), settings)
    return costs


def unsteered_perplexity(model: SteeredModel, texts: Sequence[str] | None = None) -> float:
    """Perplexity of the neutral texts under the plain model."""
    _, plain = fluency_costs(model, neutral_tokens(model, texts), [])
    return plain.perplexity


def neutral_tokens(model: SteeredModel, texts: Sequence[str] | None) -> list[list[int]]:
    """Tokens of each neutral text (default: the shipped ones), checked to fit a decode."""
    texts = load_neutral_texts() if texts is None else list(texts)
    if not texts:
        raise ValueError("no neutral texts to measure fluency on")
    token_lists = [model.tokenize_prompt(text) for text in texts]
    for text, tokens in zip(texts, token_lists):
        if len(tokens) < 2:
            raise ValueError(f"neutral text {text!r} has fewer than 2 tokens: nothing to predict")
        if len(tokens) > model.n_batch:
            raise ValueError(f"neutral text {text[:40]!r}... has {len(tokens)} tokens, "
                             f"more than n_batch={model.n_batch}")
    return token_lists


def fluency_costs(model: SteeredModel, token_lists: list[list[int]], settings: Settings,
                  **progress) -> tuple[list[FluencyCost], FluencyCost]:
    """FluencyCost per setting and the plain model's own cost, all decoded side by side."""
    tally = FluencyTally(token_lists, len(settings))
    run_side_by_side(model, [[], *settings], tally.units, **progress)
    return tally.costs()


class FluencyTally:
    """Units for every (text, setting) pair, text by text with the plain model first (setting 0;
    setting k + 1 is settings[k]), and the sums they add up. A text's plain logits are kept only
    until its steered units have been compared with them. `stride` > 1 reads the logits of every
    stride-th position only (from `offset`): an estimate of the same means from fewer logits rows."""

    def __init__(self, token_lists: list[list[int]], n_settings: int, stride: int = 1, offset: int = 0):
        self.token_lists = token_lists
        self.positions = [range(offset % stride, len(tokens), stride) for tokens in token_lists]
        self.kl_sums = np.zeros(n_settings)
        self.nll_sums = np.zeros(n_settings)
        self.kl_per_text = np.zeros((n_settings, len(token_lists)))
        self.plain_nll = 0.0
        self._reference: dict[int, _Reference] = {}
        self.units = [
            Unit(setting, tokens, self.positions[index], self._consumer(index, setting))
            for index, tokens in enumerate(token_lists)
            for setting in range(n_settings + 1)
        ]

    def _consumer(self, text: int, setting: int):
        # the token each read row predicts (-1 after the last)
        targets = np.array([*self.token_lists[text][1:], -1])[list(self.positions[text])]
        last = setting == len(self.kl_sums)

        def consume(pieces: list[np.ndarray]) -> None:
            logits = pieces[0]
            if setting == 0:
                self._reference[text] = reference = _Reference(logits, targets)
                self.plain_nll += reference.nll
            else:
                kl, nll = self._reference[text].compare(logits)
                self.kl_sums[setting - 1] += kl
                self.kl_per_text[setting - 1, text] = kl
                self.nll_sums[setting - 1] += nll
            if last:
                del self._reference[text]

        return consume

    @property
    def n_positions(self) -> int:
        return sum(len(p) for p in self.positions)

    def costs(self) -> tuple[list[FluencyCost], FluencyCost]:
        n_positions = self.n_positions
        last_read = sum(1 for tokens, p in zip(self.token_lists, self.positions) if len(tokens) - 1 in p)
        n_predicted = n_positions - last_read
        costs = [FluencyCost(float(kl / n_positions), math.exp(nll / n_predicted), n_positions)
                 for kl, nll in zip(self.kl_sums, self.nll_sums)]
        return costs, FluencyCost(0.0, math.exp(self.plain_nll / n_predicted), n_positions)

    def kl_standard_errors(self) -> np.ndarray:
        """Standard error of each setting's mean KL, texts as the sampled clusters (a ratio estimator:
        positions within a text are not independent)."""
        counts = np.array([len(p) for p in self.positions], dtype=np.float64)
        n = len(counts)
        if n < 2:
            return np.full(len(self.kl_sums), np.inf)
        means = self.kl_sums / counts.sum()
        residuals = self.kl_per_text - means[:, None] * counts[None, :]
        return np.sqrt(n / (n - 1) * (residuals**2).sum(axis=1)) / counts.sum()


def _row_logsumexp(logits: np.ndarray) -> np.ndarray:
    """log sum exp of each float32 row: float32 exponentials summed in float64."""
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64))


class _Reference:
    """A text's plain logits and what comparing steered logits with them needs."""

    def __init__(self, logits: np.ndarray, targets: np.ndarray):
        self.logits = logits.copy()
        self.targets = targets
        self.lse = _row_logsumexp(self.logits)
        self.probs = np.exp(self.logits - self.lse[:, None]).astype(np.float32)
        self.nll = self._nll(self.logits, self.lse)

    def _nll(self, logits: np.ndarray, lse: np.ndarray) -> float:
        rows = np.flatnonzero(self.targets >= 0)
        return float(np.sum(lse[rows] - logits[rows, self.targets[rows]]))

    def compare(self, steered: np.ndarray) -> tuple[float, float]:
        """Summed KL(plain || steered) over the rows, and the steered NLL of each row's next token.

        KL per row = sum_v p(v) (x_p(v) - x_q(v)) - lse_p + lse_q, with x the logits: the
        difference of logits is small and exact in float32, so equal logits cost exactly 0.
        """
        lse = _row_logsumexp(steered)
        gap = (self.probs * (self.logits - steered)).sum(axis=1, dtype=np.float64)
        return float(np.sum(gap - self.lse + lse)), self._nll(steered, lse)
