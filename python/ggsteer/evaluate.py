"""Measure steering: behaviour on held-out prompts, fluency cost on neutral text, strength sweeps.

Behaviour: the score of a prompt is log P(positive continuation) - log P(negative continuation)
(CAA-style, in nats); steering toward the positive side should raise it. Its mean over held-out
prompts as a function of strength is the behaviour curve; its slope around 0 is the vector's
steerability.

Fluency cost, measured on the shipped neutral texts (`load_neutral_texts`):
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

A sweep (`strength_sweep`) measures both at a list of strengths on one layer range;
`choose_calibration` picks the positive strength with the largest behaviour gain whose KL stays
under a bound.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

import llama_cpp
import numpy as np

from ggsteer.llama_batch import OwnedBatch

if TYPE_CHECKING:
    from ggsteer.model import SteeredModel
    from ggsteer.vector import ControlVector

# a function entering one steering setting: `with setting(): ...` runs under it
Setting = Callable[[], ContextManager]

NEUTRAL_TEXT_FILE = "neutral_text.json"
# Logit rows decoded at once for fluency: 128 MiB of float32 logits (128 rows of Gemma 3's vocabulary)
LOGITS_BUDGET_BYTES = 128 * 2**20
# steerability: least squares over the strengths within this distance of 0 ...
STEERABILITY_WINDOW = 0.25
# ... or over this many strengths nearest 0 when the window holds fewer
STEERABILITY_MIN_POINTS = 3
SAMPLE_TOKENS = 40


def _pair_tokens(model: "SteeredModel", prompt: str, continuation: str) -> tuple[list[int], int]:
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


def continuation_logprobs(model: "SteeredModel", items: Sequence[tuple[str, str]]) -> np.ndarray:
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


def behaviour_scores(model: "SteeredModel", eval_items: Sequence[dict]) -> np.ndarray:
    """log P(positive) - log P(negative) per prompt, under the model's current controls."""
    pairs = [(item["prompt"], item["positive"]) for item in eval_items] + [(item["prompt"], item["negative"]) for item in eval_items]
    logprobs = continuation_logprobs(model, pairs)
    n = len(eval_items)
    return logprobs[:n] - logprobs[n:]


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


def fluency_cost(model: "SteeredModel", texts: Sequence[str] | None = None) -> FluencyCost:
    """KL(unsteered || current controls) and perplexity under the current controls (default texts: the shipped neutral ones)."""
    costs, _ = _fluency_costs(model, _plan_neutral(model, texts), [contextlib.nullcontext])
    return costs[0]


def fluency_sweep(
    model: "SteeredModel",
    vector: "ControlVector",
    strengths: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    raw: bool = False,
    texts: Sequence[str] | None = None,
) -> list[FluencyCost]:
    """Fluency cost of `vector` at each strength; the unsteered reference is decoded once per batch."""
    settings = _settings_per_strength(model, vector, strengths, layers, raw)
    costs, _ = _fluency_costs(model, _plan_neutral(model, texts), settings)
    return costs


def unsteered_perplexity(model: "SteeredModel", texts: Sequence[str] | None = None) -> float:
    """Perplexity of the neutral texts under the plain model."""
    _, plain = _fluency_costs(model, _plan_neutral(model, texts), [])
    return plain.perplexity


def _plan_neutral(model: "SteeredModel", texts: Sequence[str] | None) -> _NeutralPlan:
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


def _fluency_costs(
    model: "SteeredModel",
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
            compared = _under_each(
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

    def __init__(self, model: "SteeredModel"):
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


# -- behaviour against strength ---------------------------------------------------------------


def behaviour_curve(
    model: "SteeredModel",
    vector: "ControlVector",
    strengths: Sequence[float],
    eval_items: Sequence[dict],
    *,
    layers: Sequence[int] | None = None,
    raw: bool = False,
) -> np.ndarray:
    """Behaviour scores [len(strengths), len(eval_items)] of `vector` at each strength."""
    settings = _settings_per_strength(model, vector, strengths, layers, raw)
    return _behaviour_per_setting(model, settings, eval_items)


def _under_each(settings: Sequence[Setting], measure: Callable[[], object], tick: Callable[[], None] | None = None) -> list:
    """`measure()` under each steering setting in turn."""
    results = []
    for setting in settings:
        with setting():
            results.append(measure())
        if tick is not None:
            tick()
    return results


def _behaviour_per_setting(model, settings: Sequence[Setting], eval_items, tick: Callable[[], None] | None = None) -> np.ndarray:
    return np.array(_under_each(settings, lambda: behaviour_scores(model, eval_items), tick))


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


def generation_sample(model: "SteeredModel", prompt: str, max_tokens: int = SAMPLE_TOKENS) -> str:
    """A greedy completion under the current controls, for a human to read."""
    # greedy decoding of a base model loops without a repeat penalty (demo.py uses the same)
    return model.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.3)["choices"][0]["text"]


# -- sweeps -----------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    strength: float
    behaviour: float  # mean behaviour score over the eval prompts, nats
    gain: float  # behaviour minus the unsteered behaviour
    wrong_way: float | None  # share of prompts that moved against the push (None at strength 0)
    kl: float  # mean KL(unsteered || steered) per position of the neutral texts, nats
    perplexity: float  # of the neutral texts under steering
    sample: str | None = None


@dataclass
class Sweep:
    """Behaviour and fluency of one vector on one layer range at several strengths."""

    layers: list[int]
    baseline_behaviour: float
    baseline_perplexity: float
    steerability: float  # nats of behaviour per unit strength around 0
    points: list[SweepPoint] = field(default_factory=list)
    baseline_sample: str | None = None

    @property
    def label(self) -> str:
        return f"layers {format_layers(self.layers)}"

    def column(self, name: str) -> np.ndarray:
        return np.array([getattr(point, name) for point in self.points], dtype=np.float64)

    def to_dict(self) -> dict:
        return {"label": self.label, **asdict(self)}


def format_layers(layers: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5,9"."""
    parts, start = [], None
    for i, il in enumerate(layers):
        start = il if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != il + 1:
            parts.append(f"{start}-{il}" if il != start else f"{il}")
            start = None
    return ",".join(parts)


def strength_sweep(
    model: "SteeredModel",
    vector: "ControlVector",
    strengths: Sequence[float],
    eval_items: Sequence[dict],
    *,
    layers: Sequence[int] | None = None,
    raw: bool = False,
    neutral_texts: Sequence[str] | None = None,
    samples: bool = False,
    progress: bool = False,
) -> Sweep:
    """Behaviour, wrong-way share, KL and perplexity of `vector` at each strength on one layer range.

    `layers` defaults to the vector's recommended layers; `samples` adds a greedy completion of
    the first eval prompt at each strength.
    """
    from tqdm import tqdm

    strengths = [float(s) for s in strengths]
    settings = _settings_per_strength(model, vector, strengths, layers, raw)
    chosen_layers = steered_layers(model, vector, layers, raw)
    plan = _plan_neutral(model, neutral_texts)
    steps = len(settings) * (1 + len(plan.groups) + int(samples))
    with tqdm(total=steps, desc=f"layers {format_layers(chosen_layers)}", unit="step", disable=not progress) as bar:
        with model.unsteered():
            baseline = behaviour_scores(model, eval_items)
        scores = _behaviour_per_setting(model, settings, eval_items, bar.update)
        costs, plain = _fluency_costs(model, plan, settings, bar.update)
        texts = _samples(model, settings, eval_items[0]["prompt"], bar.update) if samples else [None] * len(settings)
    means = scores.mean(axis=1)
    points = [
        SweepPoint(s, float(m), float(m - baseline.mean()), wrong_way_share(s, row, baseline), cost.kl, cost.perplexity, text)
        for s, m, row, cost, text in zip(strengths, means, scores, costs, texts)
    ]
    with_zero = (strengths, means) if 0.0 in strengths else ([*strengths, 0.0], [*means, baseline.mean()])
    baseline_text = _samples(model, [model.unsteered], eval_items[0]["prompt"])[0] if samples else None
    return Sweep(chosen_layers, float(baseline.mean()), plain.perplexity, steerability(*with_zero), points, baseline_text)


def _samples(model, settings, prompt: str, tick: Callable[[], None] | None = None) -> list[str]:
    return _under_each(settings, lambda: generation_sample(model, prompt), tick)


def steered_layers(
    model: "SteeredModel", vector: "ControlVector", layers: Sequence[int] | None = None, raw: bool = False
) -> list[int]:
    """The layers `model.set_control(vector, layers=layers)` steers; raises if the vector does not fit the model."""
    from ggsteer.steer import make_control

    vector.check_model(model)
    return list(make_control(vector, 0.0, model.n_layer, model.n_embd, layers, raw).layers)


def _settings_per_strength(model, vector, strengths, layers, raw) -> list[Setting]:
    if len(strengths) == 0:
        raise ValueError("no strengths to evaluate")
    for strength in strengths:
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
    steered_layers(model, vector, layers, raw)  # fail before any decoding
    return [functools.partial(model.steer, vector, float(s), layers=layers, raw=raw) for s in strengths]


def layer_windows(vector: "ControlVector", n_layer: int, n_windows: int = 3) -> list[list[int]]:
    """Layer ranges for a layer sweep: the vector's recommended layers, then `n_windows` equal
    consecutive windows over every steerable layer of the vector (Gemma 3 270M, 18 layers:
    3-14, then 1-6, 7-12, 13-17)."""
    from ggsteer.vector import default_steering_layers

    steerable = [il for il in vector.layers if 1 <= il < n_layer]
    if not steerable:
        raise ValueError(f"the vector has no layer this model can steer (it has {vector.layers}, the model 1..{n_layer - 1})")
    recommended = [il for il in (vector.recommended_layers or default_steering_layers(n_layer)) if il in steerable]
    windows = [recommended or steerable]
    for chunk in np.array_split(np.array(steerable), min(n_windows, len(steerable))):
        window = [int(il) for il in chunk]
        if window not in windows:
            windows.append(window)
    return windows


# -- calibration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    strength: float
    layers: list[int]
    gain: float  # behaviour gain over the unsteered model at that strength, nats
    kl: float  # its KL(unsteered || steered)
    max_kl: float  # the bound it was chosen under


def choose_calibration(sweeps: Sequence[Sweep], max_kl: float) -> Calibration:
    """The positive strength (and layer range) with the largest behaviour gain whose KL <= max_kl."""
    candidates = [(sweep, p) for sweep in sweeps for p in sweep.points if p.strength > 0 and p.kl <= max_kl and p.gain > 0]
    if not candidates:
        positive = [p for sweep in sweeps for p in sweep.points if p.strength > 0]
        if not positive:
            raise ValueError("calibration needs positive strengths (toward the positive persona)")
        least_kl = min(p.kl for p in positive)
        raise ValueError(
            f"no positive strength raised the behaviour score with KL <= {max_kl:g} "
            f"(the smallest KL was {least_kl:.3g}): try smaller strengths or a larger --max-kl"
        )
    sweep, best = max(candidates, key=lambda c: c[1].gain)
    return Calibration(best.strength, list(sweep.layers), best.gain, best.kl, float(max_kl))


def calibrated_vector(vector: "ControlVector", calibration: Calibration, preset: str | None = None) -> "ControlVector":
    """A copy of `vector` whose metadata recommends the calibrated strength and layers."""
    from ggsteer.vector import ControlVector

    metadata = dict(vector.metadata)
    metadata.update(
        recommended_strength=calibration.strength,
        recommended_layers=list(calibration.layers),
        calibration_max_kl=calibration.max_kl,
        calibration_kl=calibration.kl,
        calibration_gain=calibration.gain,
    )
    if preset is not None:
        metadata["eval_preset"] = preset
    return ControlVector(dict(vector.directions), vector.model_hint, metadata)


def infer_preset(vector: "ControlVector", chat_template=None) -> str | None:
    """The preset a vector is evaluated on: its `eval_preset` metadata (written by calibration),
    else the preset whose full dataset (as `ggsteer train --preset` makes it, with or without the
    model's chat template) has the vector's dataset hash; None when neither tells."""
    from ggsteer.dataset import dataset_hash, list_presets, preset_dataset

    if isinstance(vector.metadata.get("eval_preset"), str):
        return str(vector.metadata["eval_preset"])
    wanted = vector.metadata.get("dataset_hash")
    if not wanted:
        return None
    templates = [None] if chat_template is None else [None, chat_template]
    for preset in list_presets():
        for template in templates:
            if dataset_hash(preset_dataset(preset.name, chat_template=template)) == wanted:
                return preset.name
    return None


# -- plot -------------------------------------------------------------------------------------


def plot_sweeps(sweeps: Sequence[Sweep], path, *, title: str | None = None, calibration: Calibration | None = None) -> None:
    """Two panels against strength, one curve per layer range: behaviour (left) and KL (right); PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not sweeps:
        raise ValueError("no sweeps to plot")
    # Figure + Agg canvas: no pyplot, so no global backend or window is touched
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    behaviour_axes, kl_axes = figure.subplots(1, 2, sharex=True)
    for sweep in sweeps:
        strengths = sweep.column("strength")
        line, = behaviour_axes.plot(strengths, sweep.column("behaviour"), marker="o", markersize=4, label=sweep.label)
        kl_axes.plot(strengths, sweep.column("kl"), marker="o", markersize=4, color=line.get_color(), label=sweep.label)
    # every layer range shares one unsteered model
    behaviour_axes.axhline(sweeps[0].baseline_behaviour, color="gray", linestyle=":", label="unsteered")
    if calibration is not None:
        chosen = [p for s in sweeps if s.layers == calibration.layers for p in s.points if p.strength == calibration.strength]
        if chosen:
            label = f"calibrated: {calibration.strength:g} on layers {format_layers(calibration.layers)}"
            behaviour_axes.plot([calibration.strength], [chosen[0].behaviour], "k*", markersize=14, label=label)
            kl_axes.plot([calibration.strength], [chosen[0].kl], "k*", markersize=14, label=label)
            kl_axes.axhline(calibration.max_kl, color="gray", linestyle="--", linewidth=1, label=f"KL bound {calibration.max_kl:g}")
    strength_label = "strength (1.0 = trained mean gap per layer)"
    behaviour_axes.set(xlabel=strength_label, ylabel="log P(positive) - log P(negative), nats",
                       title="Behaviour on held-out prompts")
    kl_axes.set(xlabel=strength_label, ylabel="KL(unsteered || steered) per token, nats", title="Fluency cost on neutral text")
    for axes in (behaviour_axes, kl_axes):
        axes.axvline(0, color="gray", linewidth=0.8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.savefig(path, format="png", dpi=110)
