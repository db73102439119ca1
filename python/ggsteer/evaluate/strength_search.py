"""Calibration that searches the strength instead of sweeping it.

On the calibration grid (the full sweep's strengths), the KL from the unsteered model grows with the
strength, so the strengths under the budget are those below one boundary. The search finds it:
a probe strength's KL predicts the boundary (KL grows about as the square of the strength for small
pushes), the two grid strengths around the prediction are measured, and the prediction is redone
from the nearest measured strengths (a secant on log KL against log strength) until a strength under
the budget and the next one over it are both measured. KL is estimated from every `stride`-th
position of the neutral texts; where that estimate is within `z` standard errors of the budget, more
positions are read for that strength (up to all of them), so each side-of-the-budget decision holds
with that confidence. Behaviour is then scored only where it decides: at the largest strength under
the budget and below it, walking down while the gain still grows (the full sweep's choice, the
largest gain under the budget, when the gain rises and then falls with strength).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ggsteer.evaluate.behaviour import behaviour_units, steerability, wrong_way_share
from ggsteer.evaluate.calibration import Calibration, power_law_strength
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.settings import settings_per_strength, steered_layers
from ggsteer.evaluate.side_by_side import Unit, run_side_by_side
from ggsteer.evaluate.sweeps import Sweep, SweepPoint
from ggsteer.model import SteeredModel
from ggsteer.vectors import ControlVector

# every 4th neutral position at first; a decision within 2 standard errors reads more positions
KL_STRIDE = 4
KL_Z = 2.0
PROBE_STRENGTH = 0.5


@dataclass
class Work:
    """What a measurement decoded: llama_decode calls, tokens and logits rows."""

    decodes: int = 0
    tokens: int = 0
    logits_rows: int = 0

    def run(self, model: SteeredModel, settings, units: Sequence[Unit]) -> None:
        self.decodes += run_side_by_side(model, settings, units)
        self.tokens += sum(unit.n_rows for unit in units)
        self.logits_rows += sum(unit.n_outputs for unit in units)


@dataclass
class _KL:
    """A strength's KL, accumulated over the position offsets read so far."""

    sums: np.ndarray  # per text, summed KL
    counts: np.ndarray  # per text, positions read
    nll: float = 0.0
    predicted: int = 0  # positions with a next token (for perplexity)
    offsets: set = field(default_factory=set)

    @property
    def mean(self) -> float:
        return float(self.sums.sum() / self.counts.sum())

    @property
    def standard_error(self) -> float:
        n = len(self.counts)
        if n < 2:
            return math.inf
        residuals = self.sums - self.mean * self.counts
        return float(math.sqrt(n / (n - 1) * (residuals**2).sum()) / self.counts.sum())


class StrengthSearch:
    """The search on one layer range; `run()` returns the sweep of what it measured and the choice."""

    def __init__(self, model: SteeredModel, vector: ControlVector, eval_items: Sequence[dict], grid: Sequence[float],
                 max_kl: float, *, layers: Sequence[int] | None = None, raw: bool = False,
                 neutral_texts: Sequence[str] | None = None, stride: int = KL_STRIDE, z: float = KL_Z,
                 work: Work | None = None):
        self.model, self.vector, self.eval_items = model, vector, list(eval_items)
        self.grid = sorted({float(s) for s in grid if s > 0})
        if not self.grid:
            raise ValueError("calibration needs positive strengths (toward the positive persona)")
        self.max_kl, self.layers, self.raw, self.stride, self.z = float(max_kl), layers, raw, max(1, stride), z
        self.tokens = neutral_tokens(model, neutral_texts)
        self.work = Work() if work is None else work
        self.kl: dict[int, _KL] = {}
        self.behaviour: dict[int, np.ndarray] = {}
        self.baseline: np.ndarray | None = None
        self._plain: dict[int, tuple[float, int]] = {}  # per offset: the plain model's NLL sum and its positions

    # -- KL -----------------------------------------------------------------------------------

    def _offsets_left(self, index: int) -> list[int]:
        done = self.kl[index].offsets if index in self.kl else set()
        # spread: 0, stride/2, then the rest
        order = sorted(range(self.stride), key=lambda o: (bin(o)[2:].zfill(8)[::-1], o))
        return [o for o in order if o not in done]

    def _measure_kl(self, indices: list[int]) -> None:
        """Read one more offset of positions for each strength (one side-by-side run per offset)."""
        by_offset: dict[int, list[int]] = {}
        for index in indices:
            left = self._offsets_left(index)
            if left:
                by_offset.setdefault(left[0], []).append(index)
        for offset, chosen in by_offset.items():
            strengths = [self.grid[i] for i in chosen]
            settings = settings_per_strength(self.model, self.vector, strengths, self.layers, self.raw)
            tally = FluencyTally(self.tokens, len(settings), self.stride, offset)
            self.work.run(self.model, [[], *settings], tally.units)
            counts = np.array([len(p) for p in tally.positions], dtype=np.float64)
            predicted = tally.n_positions - sum(len(t) - 1 in p for t, p in zip(self.tokens, tally.positions))
            self._plain[offset] = (tally.plain_nll, predicted)
            for k, index in enumerate(chosen):
                entry = self.kl.setdefault(index, _KL(np.zeros(len(self.tokens)), np.zeros(len(self.tokens))))
                entry.sums += tally.kl_per_text[k]
                entry.counts += counts
                entry.nll += tally.nll_sums[k]
                entry.predicted += predicted
                entry.offsets.add(offset)

    def _under_budget(self, index: int) -> bool:
        """Whether the strength's KL is within the budget, reading more positions until the answer
        holds with z standard errors (or every position has been read)."""
        if index not in self.kl:
            self._measure_kl([index])
        entry = self.kl[index]
        while abs(entry.mean - self.max_kl) <= self.z * entry.standard_error and self._offsets_left(index):
            self._measure_kl([index])
        return entry.mean <= self.max_kl

    def _predict(self) -> float:
        """The strength where KL meets the budget, from the measured strengths nearest it."""
        points = sorted((self.grid[i], e.mean) for i, e in self.kl.items() if e.mean > 0)
        if not points:
            return self.grid[-1]
        below = [p for p in points if p[1] <= self.max_kl]
        above = [p for p in points if p[1] > self.max_kl]
        if below and above:
            return power_law_strength(below[-1], above[0], self.max_kl)
        if len(points) >= 2:
            return power_law_strength(*((points[-2], points[-1]) if below else (points[0], points[1])), self.max_kl)
        return power_law_strength(points[0], None, self.max_kl)

    def boundary(self) -> int:
        """Index of the largest grid strength under the budget (-1 when none is)."""
        lo, hi = -1, len(self.grid)  # known: everything <= lo is under, everything >= hi is over
        self._measure_kl([self._nearest(PROBE_STRENGTH)])
        while hi - lo > 1:
            guess = self._predict()
            below = max(lo + 1, min(hi - 1, int(np.searchsorted(self.grid, guess + 1e-9)) - 1))
            pair = [i for i in (below, below + 1) if lo < i < hi and i not in self.kl]
            if pair:
                self._measure_kl(pair)
            for index in sorted(i for i in self.kl if lo < i < hi):
                if self._under_budget(index):
                    lo = max(lo, index)
                else:
                    hi = min(hi, index)
            if not pair and hi - lo > 1:  # the prediction fell on known strengths: bisect
                self._measure_kl([(lo + hi) // 2])
        return lo

    def _nearest(self, strength: float) -> int:
        return int(np.argmin([abs(s - strength) for s in self.grid]))

    # -- behaviour --------------------------------------------------------------------------------

    def _score(self, indices: list[int]) -> None:
        """Behaviour scores at these strengths (and the plain model's, the first time)."""
        indices = [i for i in indices if i not in self.behaviour]
        if not indices:
            return
        strengths = [self.grid[i] for i in indices]
        settings = settings_per_strength(self.model, self.vector, strengths, self.layers, self.raw)
        units, logprobs = behaviour_units(self.model, len(settings) + 1, self.eval_items)
        if self.baseline is not None:
            units = [u for u in units if u.setting != 0]
        self.work.run(self.model, [[], *settings], units)
        scores = logprobs[:, 0] - logprobs[:, 1]
        if self.baseline is None:
            self.baseline = scores[0]
        for k, index in enumerate(indices):
            self.behaviour[index] = scores[1 + k]

    def _gain(self, index: int) -> float:
        return float(self.behaviour[index].mean() - self.baseline.mean())

    def choose(self, top: int) -> int:
        """From the largest strength under the budget down, while the gain still grows."""
        best = top
        self._score([top, top - 1] if top > 0 else [top])
        while best > 0:
            self._score([best - 1])
            if self._gain(best - 1) <= self._gain(best):
                break
            best -= 1
        return best

    def run(self) -> tuple[Sweep, Calibration]:
        top = self.boundary()
        if top < 0:
            least = min(e.mean for e in self.kl.values())
            raise ValueError(f"no positive strength keeps KL <= {self.max_kl:g} (the smallest measured KL was "
                             f"{least:.3g} at {self.grid[0]:g}): try smaller strengths or a larger --max-kl")
        best = self.choose(top)
        if self._gain(best) <= 0:
            raise ValueError(f"no positive strength raised the behaviour score with KL <= {self.max_kl:g}")
        sweep = self.sweep()
        entry = self.kl[best]
        layers = steered_layers(self.model, self.vector, self.layers, self.raw)
        return sweep, Calibration(self.grid[best], layers, self._gain(best), entry.mean, self.max_kl)

    def sweep(self) -> Sweep:
        """What was measured, as a Sweep (behaviour NaN where only KL was needed, and the reverse)."""
        layers = steered_layers(self.model, self.vector, self.layers, self.raw)
        base = self.baseline if self.baseline is not None else np.zeros(len(self.eval_items))
        points = []
        for index in sorted(set(self.kl) | set(self.behaviour)):
            strength = self.grid[index]
            kl = self.kl.get(index)
            row = self.behaviour.get(index)
            points.append(SweepPoint(
                strength,
                float(row.mean()) if row is not None else math.nan,
                float(row.mean() - base.mean()) if row is not None else math.nan,
                wrong_way_share(strength, row, base) if row is not None else None,
                kl.mean if kl is not None else math.nan,
                math.exp(kl.nll / kl.predicted) if kl is not None and kl.predicted else math.nan,
            ))
        scored = [(p.strength, p.behaviour) for p in points if not math.isnan(p.behaviour)]
        slope = steerability([0.0, *(s for s, _ in scored)], [float(base.mean()), *(b for _, b in scored)])
        nll, predicted = (sum(v) for v in zip(*self._plain.values())) if self._plain else (math.nan, 1)
        perplexity = math.exp(nll / predicted) if predicted else math.nan
        return Sweep(list(layers), float(base.mean()), perplexity, slope, points)


def search_calibration(model: SteeredModel, vector: ControlVector, eval_items: Sequence[dict],
                       grid: Sequence[float], max_kl: float, **options) -> tuple[Sweep, Calibration]:
    """Calibrate `vector` on one layer range by searching `grid` (see the module docstring)."""
    return StrengthSearch(model, vector, eval_items, grid, max_kl, **options).run()
