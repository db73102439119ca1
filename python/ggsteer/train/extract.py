"""From contrastive pairs to a ControlVector: capture every layer, reduce each to a direction.

Two public steps, as steering-vectors splits them: `capture_hidden_states` (train/capture.py) reads
the residual stream, and `methods.fit_layer` reduces one layer's positive and negative states to a
direction with a meaningful sign, its gap and its neutral point. `ControlVector.train`,
`from_prompts` and `from_phrase` are thin entry points into this module.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np

from ggsteer.runtime.protocol import HookedModel
from ggsteer.train import methods
from ggsteer.train.capture import CaptureStats, capture_hidden_states, capture_pooled
from ggsteer.train.capture_plan import Pool
from ggsteer.train.dataset import DatasetEntry, dataset_hash
from ggsteer.train.stability import stability_metadata
from ggsteer.vectors import (
    UNIT_GAP,
    UNIT_RAW,
    ControlVector,
    TokenAlignedVector,
    default_steering_layers,
    default_training_layers,
    projection,
)

# "suffix": the mean over the suffix a pair's two prompts continue with (see pair_pools)
TRAIN_POOLS = ("suffix", "last", "mean")
DEFAULT_POOL = "suffix"


class TrainingWarning(UserWarning):
    """A layer whose direction barely separates the pairs: its sign is unreliable."""


def train_vector(
    model: HookedModel,
    dataset: Sequence[DatasetEntry],
    method: str = "mean_diff",
    layers: Iterable[int] | None = None,
    pool: str = DEFAULT_POOL,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    stats: CaptureStats | None = None,
) -> ControlVector:
    """Train on contrastive pairs: one direction per layer, pointing negative -> positive.

    Every pair is used (train/rounds.py stops earlier, once the direction is stable). `layers`
    defaults to every layer llama.cpp can steer (1..n_layer-1); `stats` counts the capture's work.
    """
    entries = checked_entries(dataset, method, pool)
    train_layers = training_layers(model, layers)
    prompts = [text for entry in entries for text in (entry.positive, entry.negative)]
    extra = extra_prompts(prompts)
    pools = pair_pools(model, prompts, pool) + extra_pools(extra)
    with model.unsteered():
        states = capture_pooled(model, prompts + extra[0] + extra[1], pools,
                                layers=train_layers, batch_size=batch_size, progress=progress, stats=stats)
    hidden = np.stack(states[: len(prompts)])
    extra_states = split_extra(states[len(prompts):], extra)
    return fit_vector(model, entries, method, pool, train_layers, hidden, extra_states, entries,
                      stability_metadata(hidden, method))


def pair_pools(model: HookedModel, prompts: list[str], pool: str) -> list[Pool]:
    """Each prompt's capture pool for the training pool `pool`, prompts given positive, negative, ...

    "suffix" reads the mean over the suffix both prompts of a pair continue with: the tokens they end
    with in common, less those that open every pair's ending (the end of the persona sentence and a
    chat template's turn markers, the same text in every pair). The suffix tokens carry the persona's
    effect on the text after it and vary less from pair to pair than the last token alone. A pair
    whose ending is all opening, or that shares no ending, reads its last token.
    """
    if pool != "suffix":
        return [pool] * len(prompts)
    tokens = [model.tokenize_prompt(prompt) for prompt in prompts]
    endings = [shared_ending(positive, negative) for positive, negative in zip(tokens[0::2], tokens[1::2])]
    opening = common_prefix_length(endings) if len(endings) > 1 else 0
    return [max(len(ending) - opening, 1) for ending in endings for _ in range(2)]


def shared_ending(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """The tokens `a` and `b` end with in common."""
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count] == b[-1 - count]:
        count += 1
    return list(a[len(a) - count:])


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(map(len, sequences))
    count = 0
    while count < shortest and all(seq[count] == sequences[0][count] for seq in sequences):
        count += 1
    return count


def training_layers(model: HookedModel, layers: Iterable[int] | None) -> list[int]:
    return default_training_layers(model.n_layer) if layers is None else [int(il) for il in layers]


def extra_prompts(prompts: list[str]) -> tuple[list[str], list[str]]:
    """Prompts captured besides each prompt's pooled state: every token of a few of them (the
    directions ordinary tokens share, vectors/projection.py; the last layer keeps its raw direction,
    tests/test_projection.py), and of some pairs the mean over all tokens (what ablate and clamp act on)."""
    return projection.shared_prompts(prompts), projection.ablation_prompts(prompts)


def extra_pools(extra: tuple[list[str], list[str]]) -> list[str]:
    return ["all"] * len(extra[0]) + ["mean"] * len(extra[1])


def split_extra(states: list[np.ndarray], extra: tuple[list[str], list[str]]) -> tuple[list, list]:
    """The captured states of `extra_prompts`: (every token of the shared ones, the mean-pooled ones)."""
    return states[: len(extra[0])], states[len(extra[0]):]


def fit_vector(model: HookedModel, _entries: list[DatasetEntry], method: str, pool: str, train_layers: list[int],
               hidden: np.ndarray, extra_states: tuple[list, list], offered: Sequence[DatasetEntry],
               extra_metadata: dict | None = None) -> ControlVector:
    """The vector from the pooled states `hidden` [2 * pairs, layers, n_embd] (positive, negative,
    ...) of `_entries` and the states of their `extra_prompts`; `offered` is the dataset they came from."""
    shared_layers = [il for il in train_layers if il != model.n_layer - 1]
    tokens = [s[:, [train_layers.index(il) for il in shared_layers]] for s in extra_states[0]]
    mean_pooled = np.stack(extra_states[1])
    fits = [methods.fit_layer(hidden[0::2, k], hidden[1::2, k], method) for k in range(len(train_layers))]
    _warn_near_chance(train_layers, fits)
    ablation = [
        projection.fit_projection(hidden[0::2, k], hidden[1::2, k],
                                  _ablation_source(mean_pooled[:, k], fit.direction, il in shared_layers),
                                  _shared_directions(tokens, shared_layers, il, model.n_embd))
        for k, (il, fit) in enumerate(zip(train_layers, fits))
    ]
    directions = {il: fit.direction * abs(fit.gap) for il, fit in zip(train_layers, fits)}
    recommended = [il for il in default_steering_layers(model.n_layer) if il in directions]
    metadata = {
        "unit": UNIT_GAP,
        "method": method,
        "pool": pool,
        "model_name": model.model_name,
        "n_embd": model.n_embd,
        "n_layer": model.n_layer,
        "layers": list(train_layers),
        "separation": [fit.separation for fit in fits],
        "gap": [abs(fit.gap) for fit in fits],
        "residual_norm": [fit.residual_norm for fit in fits],
        "center": [fit.center for fit in fits],
        "ablation_direction": np.concatenate([a.direction for a in ablation]).tolist(),
        "ablation_center": [a.center for a in ablation],
        "ablation_gap": [a.gap for a in ablation],
        "dataset_size": len(offered),
        "dataset_hash": dataset_hash(offered),
        "recommended_layers": recommended or list(train_layers),
        **(extra_metadata or {}),
    }
    return ControlVector(directions, model_hint=model.model_hint, metadata=metadata)


def _ablation_source(mean_pooled: np.ndarray, trained: np.ndarray, token_states: bool) -> np.ndarray:
    """What u' is made from: the mean-pooled pair difference where token states were captured (it
    carries the behaviour of every token, not the last one's), else the trained direction."""
    if not token_states:
        return trained
    difference = projection.mean_pooled_difference(mean_pooled)
    return difference if np.linalg.norm(difference) > 0 else trained


def _shared_directions(tokens, shared_layers: list[int], layer: int, n_embd: int) -> np.ndarray:
    """The directions ordinary tokens share at `layer` and the sink's; none (the raw direction is
    kept) where not captured."""
    if layer not in shared_layers:
        return np.zeros((0, n_embd))
    return projection.kept_out_directions(tokens, shared_layers.index(layer))


def checked_entries(dataset: Sequence[DatasetEntry], method: str, pool: str) -> list[DatasetEntry]:
    if method not in methods.METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(methods.METHODS)}")
    entries = list(dataset)
    if not entries:
        raise ValueError("the dataset is empty: give at least one (positive, negative) pair")
    for i, entry in enumerate(entries):
        if not isinstance(entry, DatasetEntry):
            raise TypeError(f"dataset item {i} is {type(entry).__name__}, not DatasetEntry")
    if pool not in TRAIN_POOLS:
        raise ValueError(f"pool must be one of {', '.join(TRAIN_POOLS)} for training, got {pool!r}")
    return entries


def token_aligned_difference(model: HookedModel, positive: str, negative: str, layer: int) -> TokenAlignedVector:
    """ActAdd: the per-token activation difference of two prompts at one layer.

    The shorter prompt is padded with spaces until both have the same number of tokens. Steering
    with the result (`model.set_control(v, coefficient)`) adds row p to position p of each
    sequence, for the first positions only, as the ActAdd paper does.
    """
    pos_text, neg_text = pad_to_same_length(model, positive, negative)
    with model.unsteered():
        states = capture_hidden_states(model, [pos_text, neg_text], layers=[layer], pool="all")
    rows = (states[0][:, 0] - states[1][:, 0]).astype(np.float32)
    return TokenAlignedVector(layer=int(layer), rows=rows, model_hint=model.model_hint)


def phrase_vector(model: HookedModel, phrase: str, layer: int) -> ControlVector:
    """A "memory vector": the mean activation of a phrase at one layer (raw unit).

    Inject it while generating, e.g. `model.set_control(v, 0.2, raw=True, when="generated")`.
    """
    with model.unsteered():
        mean = capture_hidden_states(model, [phrase], layers=[layer], pool="mean")[0, 0]
    metadata = {"unit": UNIT_RAW, "method": "memory", "model_name": model.model_name}
    return ControlVector({int(layer): mean}, model.model_hint, metadata)


def pad_to_same_length(model: HookedModel, a: str, b: str, max_pad: int = 64) -> tuple[str, str]:
    for _ in range(max_pad):
        na, nb = len(model.tokenize_prompt(a)), len(model.tokenize_prompt(b))
        if na == nb:
            return a, b
        if na < nb:
            a += " "
        else:
            b += " "
    raise ValueError(f"could not pad {a!r} and {b!r} to the same number of tokens with spaces")


def _warn_near_chance(layers: list[int], fits: list[methods.LayerFit]) -> None:
    weak = [il for il, fit in zip(layers, fits) if fit.separation < methods.NEAR_CHANCE_SEPARATION]
    if weak:
        warnings.warn(
            f"layers {weak} separate the pairs barely better than chance "
            f"(separation < {methods.NEAR_CHANCE_SEPARATION}); their directions' signs are unreliable",
            TrainingWarning,
            stacklevel=4,
        )
