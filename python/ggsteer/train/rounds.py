"""Training in rounds: capture pairs until the direction is known, not every pair offered.

The pairs are taken in a balanced order (`balanced_order`: every persona pair of a preset in each
block, the blocks spread evenly over the suffixes), starting from a floor and tripling each round up to a cap.
Each round captures only its new pairs (the token trie of train/capture.py, as one training pass
does) and measures the split-half stability of the direction at the steering layers
(train/stability.py); training stops at the first round whose median stability reaches the target.
The extra prompts the ablation direction needs (whole token rows of a few prompts, the mean-pooled
states of some pairs) are the first pairs of the same order, captured in the same passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ggsteer.runtime.protocol import HookedModel
from ggsteer.train.capture import CaptureStats, capture_pooled
from ggsteer.train.capture_plan import Pool
from ggsteer.train.dataset import DatasetEntry
from ggsteer.train.extract import DEFAULT_POOL, checked_entries, fit_vector, pair_pools, training_layers
from ggsteer.train.stability import layer_stability, stability_metadata
from ggsteer.vectors import ControlVector, default_steering_layers, projection

# The first round's pairs (16 suffixes of a 3-persona preset), how much each round multiplies them, the
# most pairs a round may reach (a preset has 1,536; the persona prompts are decoded again each round, and
# with SmolLM2's chat template 4 rounds to 320 pairs took 0.27 of the tokens: 3 rounds to 288 stay under 1/4), and
# the median stability at the steering layers that ends the rounds (an expected |cos| with the
# direction of unlimited pairs; see docs/efficient-training.md for how these were measured).
DEFAULT_MIN_PAIRS = 48
DEFAULT_GROWTH = 3
DEFAULT_MAX_PAIRS = 288
DEFAULT_TARGET = 0.995


@dataclass(frozen=True)
class RoundsPolicy:
    min_pairs: int = DEFAULT_MIN_PAIRS
    max_pairs: int | None = DEFAULT_MAX_PAIRS  # None: no cap but the dataset
    target: float = DEFAULT_TARGET
    growth: int = DEFAULT_GROWTH

    def __post_init__(self) -> None:
        if self.min_pairs < 1:
            raise ValueError(f"min_pairs must be at least 1, got {self.min_pairs}")
        if self.max_pairs is not None and self.max_pairs < self.min_pairs:
            raise ValueError(f"max_pairs ({self.max_pairs}) must be at least min_pairs ({self.min_pairs})")
        if self.growth < 2:
            raise ValueError(f"growth must be at least 2, got {self.growth}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"the stability target must be in (0, 1], got {self.target}")


@dataclass
class RoundsLog:
    """What the rounds did: pairs after each round and the median stability then."""

    pairs: list[int] = field(default_factory=list)
    stability: list[float] = field(default_factory=list)
    stopped: str = ""  # "stable", "cap" or "all pairs"


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread evenly over the range (bit-reversed)."""
    if n <= 1:
        return list(range(n))
    bits = (n - 1).bit_length()
    keys = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(2**bits)]
    return [i for _, i in sorted(zip(keys, range(2**bits))) if i < n]


def balanced_order(n_pairs: int, period: int = 1) -> list[int]:
    """Pair indices in training order: blocks of `period` consecutive pairs (a preset's persona pairs
    for one suffix: make_dataset is suffix-major), the blocks in `spread_order`."""
    period = max(1, int(period))
    n_blocks = -(-n_pairs // period)
    return [b * period + k for b in spread_order(n_blocks) for k in range(period) if b * period + k < n_pairs]


def train_in_rounds(
    model: HookedModel,
    dataset: Sequence[DatasetEntry],
    method: str = "mean_diff",
    layers: Iterable[int] | None = None,
    pool: str = DEFAULT_POOL,
    *,
    policy: RoundsPolicy = RoundsPolicy(),
    period: int = 1,
    batch_size: int | None = None,
    progress: bool | None = None,
    stats: CaptureStats | None = None,
    log: RoundsLog | None = None,
) -> ControlVector:
    """Like train_vector, on as many pairs (in `balanced_order`) as make the direction stable."""
    offered = checked_entries(dataset, method, pool)
    train_layers = training_layers(model, layers)
    steering = [k for k, il in enumerate(train_layers) if il in default_steering_layers(model.n_layer)]
    steering = steering or list(range(len(train_layers)))
    order = balanced_order(len(offered), period)[: policy.max_pairs]
    pools = pair_pools(model, [text for i in order for text in (offered[i].positive, offered[i].negative)], pool)
    log = RoundsLog() if log is None else log
    chunks: list[np.ndarray] = []
    shared: list[np.ndarray] = []
    pooled: list[np.ndarray] = []
    n = min(policy.min_pairs, len(order))
    with model.unsteered():
        while True:
            states = _capture_round(model, [offered[i] for i in order], pools, sum(map(len, chunks)) // 2, n,
                                    train_layers, batch_size=batch_size, progress=progress, stats=stats)
            chunks.append(states[0])
            shared += states[1]
            pooled += states[2]
            hidden = np.concatenate(chunks)
            log.pairs.append(n)
            log.stability.append(_median_stability(hidden[:, steering], method, period))
            if log.stability[-1] >= policy.target or n == len(order):
                break
            n = min(policy.growth * n, len(order))
    log.stopped = "stable" if log.stability[-1] >= policy.target else ("all pairs" if n == len(offered) else "cap")
    metadata = {**stability_metadata(hidden, method, period), "pairs_used": n}
    entries = [offered[i] for i in order[:n]]
    return fit_vector(model, entries, method, pool, train_layers, hidden, (shared, pooled), offered, metadata)


def _capture_round(model, ordered: list[DatasetEntry], pools: list[Pool], start: int, stop: int, layers: list[int],
                   **options) -> tuple[np.ndarray, list, list]:
    """States of pairs [start, stop) of the training order (pooled as `pools`, one per prompt of the
    order), and in the same pass (the same tokens) the extra prompts among them: every token of the
    first pairs' prompts and the mean over the tokens of the first ABLATION_PAIRS pairs (a prefix of
    the balanced order is spread over the whole dataset)."""
    new = ordered[start:stop]
    prompts = [text for entry in new for text in (entry.positive, entry.negative)]
    shared = [text for k, entry in enumerate(new, start) if 2 * k < projection.SHARED_PROMPTS
              for text in (entry.positive, entry.negative)]
    pooled = [text for k, entry in enumerate(new, start) if k < projection.ABLATION_PAIRS
              for text in (entry.positive, entry.negative)]
    every = pools[2 * start: 2 * stop] + ["all"] * len(shared) + ["mean"] * len(pooled)
    states = capture_pooled(model, prompts + shared + pooled, every, layers=layers, **options)
    first, second = len(prompts), len(prompts) + len(shared)
    return np.stack(states[:first]), states[first:second], states[second:]


def _median_stability(hidden: np.ndarray, method: str, period: int) -> float:
    values = layer_stability(hidden, method, period)
    return 0.0 if values is None else float(np.median(values))
