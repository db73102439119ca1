"""Tuning: a search over the layer window, op, position gating and strength of one vector that
maximises the behaviour gain on held-out prompts while the fluency cost (KL on neutral text) stays
within a budget.

- The optimiser is optuna's TPE sampler (seeded, so a search is repeatable), told the KL excess as a
  constraint; candidates are decoded side by side with the plain model, a few per decode pass, like
  calibration's sweeps (evaluate/sweeps.py).
- The eval prompts are split in two: the search scores on one half; the chosen and the default
  settings are then measured on the other half, and only that number is reported as the result.
- The default settings are the file's recommended (calibrated) ones: plain addition on every token.
  They are measured first, so "nothing beats the default" is a measured statement.
- The last pass measures the windows, ops and gatings that moved furthest per sqrt(KL) at the
  strength predicted to meet the budget: the gain grows with strength up to the budget's edge, where
  a sampler rarely lands.
- The default is also measured at the chosen settings' KL (its strength scaled), so the reported
  ratio compares settings at equal KL, not budget use (evaluate/tune_report.py).
- Ctrl-C during the search stops it; the best settings measured so far are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ggsteer.evaluate.behaviour import behaviour_units
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.side_by_side import run_side_by_side
from ggsteer.evaluate.sweeps import format_layers
from ggsteer.evaluate.tune_report import Report, next_strength
from ggsteer.evaluate.tune_report import report as report_at_equal_kl
from ggsteer.model import SteeredModel
from ggsteer.vectors import ControlVector, default_steering_layers

SEARCH_OPS = ("add", "add_normalized", "clamp")
SEARCH_WHEN = ("all", "generated")
STRENGTH_RANGE = (0.05, 2.0)
DEFAULT_BUDGET = 40
DEFAULT_SEED = 0
# the search reads the KL at every 4th neutral position (as calibration's search starts); the report reads all
SEARCH_KL_STRIDE = 4
# candidates measured per side-by-side pass: the plain model's decode is shared by them
CANDIDATES_PER_PASS = 4
# the last pass aims the best structures at this share of the KL budget
EDGE_MARGIN = 0.97
# rounds that bring a choice back within the budget when every position's KL exceeds it
BACK_ROUNDS = 3


@dataclass(frozen=True)
class Setting:
    """One way to steer with the vector."""

    op: str
    when: str
    layers: tuple[int, ...]
    strength: float

    @property
    def label(self) -> str:
        return f"{self.op} {self.when} layers {format_layers(self.layers)} strength {self.strength:.3g}"


@dataclass(frozen=True)
class Trial:
    setting: Setting
    gain: float  # mean behaviour move over the plain model on the scoring prompts, nats
    kl: float  # mean KL(unsteered || steered) per position of the neutral texts, nats
    number: int  # order of measurement; the default is 0


@dataclass
class TuneResult:
    default: Trial
    trials: list[Trial]  # every measured candidate, the default first
    max_kl: float
    interrupted: bool = False
    chosen: Trial | None = None  # the best candidate within the budget when it beats the default
    report: Report | None = None
    n_score: int = 0
    n_report: int = 0
    front: list[Trial] = field(default_factory=list)  # the Pareto front of the trials within the budget

    @property
    def beats_default(self) -> bool:
        return self.chosen is not None


# -- measuring candidates -----------------------------------------------------------------------


def split_prompts(items: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Scoring prompts (even positions) and report prompts (odd positions)."""
    if len(items) < 2:
        raise ValueError(f"tuning needs at least 2 eval prompts (one to score on, one to report on), got {len(items)}")
    return list(items[0::2]), list(items[1::2])


def measure(model: SteeredModel, vector: ControlVector | Sequence[ControlVector], settings: Sequence[Setting],
            items: Sequence[dict], neutral: list[list[int]], raw: bool = False,
            stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour moves [len(settings), len(items)] over the plain model and KL per setting (from
    every `stride`-th neutral position), every setting decoded side by side with the plain model.
    `vector` is the one every setting steers with, or one per setting. Under `when="generated"` the
    continuations (behaviour) and every neutral-text token after the first are decoded as generated tokens."""
    vectors = [vector] * len(settings) if isinstance(vector, ControlVector) else list(vector)
    if len(vectors) != len(settings):
        raise ValueError(f"{len(vectors)} vectors for {len(settings)} settings: give one, or one per setting")
    interventions = [[]] + [[interventions_of(model, v, s, raw)] for v, s in zip(vectors, settings)]
    fluency = FluencyTally(neutral, len(settings), stride)
    units, logprobs = behaviour_units(model, len(interventions), items)
    units = fluency.units + units
    for unit in units:
        if unit.setting > 0 and settings[unit.setting - 1].when == "generated":
            unit.generated_from = len(unit.prefix) if unit.branches else 1
    run_side_by_side(model, interventions, units)
    scores = logprobs[:, 0] - logprobs[:, 1]
    costs, _ = fluency.costs()
    return scores[1:] - scores[0], np.array([cost.kl for cost in costs])


def interventions_of(model: SteeredModel, vector: ControlVector, setting: Setting, raw: bool = False):
    return model.intervention(vector, setting.strength, op=setting.op, when=setting.when,
                              layers=list(setting.layers), raw=raw)


def default_setting(model: SteeredModel, vector: ControlVector) -> Setting:
    """The file's recommended (calibrated) settings: addition on every token."""
    preferred = vector.recommended_layers or default_steering_layers(model.n_layer)
    layers = [il for il in preferred if il in vector.directions and 1 <= il < model.n_layer]
    layers = layers or steerable_layers(model, vector)
    return Setting("add", "all", tuple(layers), float(vector.recommended_strength or 1.0))


def steerable_layers(model: SteeredModel, vector: ControlVector) -> list[int]:
    layers = [il for il in vector.layers if 1 <= il < model.n_layer]
    if not layers:
        raise ValueError(f"the vector has no layer this model can steer (it has {vector.layers}, "
                         f"the model 1..{model.n_layer - 1})")
    return layers


# -- the search ---------------------------------------------------------------------------------


def tune(model: SteeredModel, vector: ControlVector, eval_items: Sequence[dict], *, max_kl: float,
         budget: int = DEFAULT_BUDGET, ops: Sequence[str] = SEARCH_OPS, whens: Sequence[str] = SEARCH_WHEN,
         strength_range: tuple[float, float] = STRENGTH_RANGE, seed: int = DEFAULT_SEED,
         neutral_texts: Sequence[str] | None = None, raw: bool = False, progress: bool = False,
         kl_stride: int = SEARCH_KL_STRIDE) -> TuneResult:
    """Search `budget` candidates after the default; see the module docstring."""
    _check_search(max_kl, budget, ops, whens, strength_range)
    if kl_stride < 1:
        raise ValueError(f"the KL stride must be at least 1 (every position), got {kl_stride}")
    score_items, report_items = split_prompts(eval_items)
    layers = steerable_layers(model, vector)
    vector.check_model(model)
    neutral = neutral_tokens(model, neutral_texts)
    default = default_setting(model, vector)
    for setting in (default, Setting(ops[0], whens[0], tuple(layers), strength_range[0])):
        interventions_of(model, vector, setting, raw)  # a vector that cannot be steered fails before decoding
    study = _study(seed)
    trials: list[Trial] = []
    interrupted = False
    with tqdm(total=budget + 1, desc="tune", unit="candidate", disable=not progress) as bar:
        try:
            while len(trials) < budget + 1:
                settings, asked = _next_pass(study, trials, default, budget, max_kl, layers, ops, whens, strength_range)
                moves, kls = measure(model, vector, settings, score_items, neutral, raw, kl_stride)
                start = len(trials)
                for k, setting in enumerate(settings):
                    trials.append(Trial(setting, float(moves[k].mean()), float(kls[k]), start + k))
                if start == 0:
                    _tell_default(study, trials[0], max_kl, layers, ops, whens, strength_range)
                for optuna_trial, trial in zip(asked, trials[len(trials) - len(asked):]):
                    optuna_trial.set_constraint("kl_over_budget", trial.kl - max_kl)
                    study.tell(optuna_trial, trial.gain)
                bar.update(len(settings))
                _show_best(bar, trials, max_kl)
        except KeyboardInterrupt:
            if not trials:
                raise
            interrupted = True
    front = pareto_front([t for t in trials if t.kl <= max_kl])
    result = TuneResult(trials[0], trials, float(max_kl), interrupted, n_score=len(score_items),
                        n_report=len(report_items), front=front)
    result.chosen = choose(trials, max_kl)
    if result.chosen is not None:
        result.report = report(model, vector, result.default.setting, result.chosen.setting, report_items,
                               neutral, raw, seed)
        if kl_stride > 1 and result.report.tuned_kl > max_kl:
            _back_within_budget(result, model, vector, score_items, report_items, neutral, raw, seed)
    return result


def _back_within_budget(result: TuneResult, model, vector, score_items, report_items, neutral, raw, seed) -> None:
    """The search's KL (every kl_stride-th position) was under the budget, every position's is not:
    the chosen structure again at strengths predicted to meet the budget (a secant on log KL, a few
    rounds), scored on every position, then reported."""
    chosen = result.chosen.setting
    points = [(chosen.strength, result.report.tuned_kl, None)]
    for _ in range(BACK_ROUNDS):
        setting = replace(chosen, strength=next_strength(points, EDGE_MARGIN * result.max_kl))
        moves, kls = measure(model, vector, [setting], score_items, neutral, raw)
        result.chosen = Trial(setting, float(moves[0].mean()), float(kls[0]), len(result.trials))
        result.trials.append(result.chosen)
        points.append((setting.strength, result.chosen.kl, None))
        if result.chosen.kl <= result.max_kl:
            break
    result.report = report(model, vector, result.default.setting, result.chosen.setting, report_items, neutral,
                           raw, seed)


def _check_search(max_kl, budget, ops, whens, strength_range) -> None:
    from ggsteer.steering.interventions import OPS, WHEN

    if not (math.isfinite(max_kl) and max_kl > 0):
        raise ValueError(f"the KL budget must be a positive number, got {max_kl}")
    if budget < 1:
        raise ValueError(f"the search budget must be at least 1 candidate, got {budget}")
    for op in ops:
        if op not in OPS or op == "ablate":
            raise ValueError(f"cannot tune op {op!r}: choose from add, add_normalized, clamp")
    for when in whens:
        if when not in WHEN:
            raise ValueError(f"cannot tune when {when!r}: choose from {', '.join(WHEN)}")
    if not ops or not whens:
        raise ValueError("give at least one op and one position gating to search")
    low, high = strength_range
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f"the strength range must satisfy 0 < low <= high, got {low}..{high}")


def _study(seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the KL excess is each trial's constraint (`set_constraint`): TPE models feasible trials apart
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))


def _next_pass(study, trials, default, budget, max_kl, layers, ops, whens, strength_range):
    """The settings of the next side-by-side pass and the optuna trials among them (the last ones).
    First pass: the default, then sampled candidates. Last pass (budgets of two passes or more): the
    best structures so far at the budget's edge, where TPE rarely lands."""
    remaining = budget + 1 - len(trials)
    reserve = CANDIDATES_PER_PASS if budget >= 2 * CANDIDATES_PER_PASS else 0  # kept for the last pass
    settings = [] if trials else [default]
    room = min(CANDIDATES_PER_PASS, remaining - reserve) if remaining > reserve else remaining
    if remaining <= reserve:
        settings = _at_the_edge(trials, max_kl, room, strength_range[1])
    asked = [study.ask() for _ in range(room - len(settings))]
    return settings + [_suggest(t, layers, ops, whens, strength_range) for t in asked], asked


def _at_the_edge(trials: Sequence[Trial], max_kl: float, count: int, highest: float) -> list[Setting]:
    """The structures (window, op, gating) that moved furthest per sqrt(KL), each at the strength
    predicted to meet the budget. For small pushes the move grows as the strength and the KL as its
    square, so move / sqrt(KL) ranks structures by what they move at equal KL."""
    groups: dict[tuple, list[Trial]] = {}
    for trial in trials:
        if trial.kl > 0 and trial.gain > 0:
            groups.setdefault((trial.setting.layers, trial.setting.op, trial.setting.when), []).append(trial)
    ranked = sorted(groups.values(), key=lambda group: -max(t.gain / math.sqrt(t.kl) for t in group))
    tried, settings = {t.setting for t in trials}, []
    for group in ranked:
        strength = next_strength([(t.setting.strength, t.kl, None) for t in group], EDGE_MARGIN * max_kl)
        setting = replace(group[0].setting, strength=round(min(highest, strength), 4)) if strength else None
        if setting is not None and setting not in tried and setting not in settings:
            settings.append(setting)
        if len(settings) == count:
            break
    return settings


def _tell_default(study, default: Trial, max_kl, layers, ops, whens, strength_range) -> None:
    """Give the sampler the default's result too when it lies in the search space: a good start."""
    import optuna.distributions as dist
    from optuna.trial import create_trial

    setting, (low, high) = default.setting, strength_range
    window = list(setting.layers)
    start = layers.index(window[0]) if window[0] in layers else -1
    if (start < 0 or layers[start : start + len(window)] != window or setting.op not in ops
            or setting.when not in whens or not low <= setting.strength <= high):
        return
    index = dist.IntDistribution(0, len(layers) - 1)
    distributions = {"first": index, "last": index, "op": dist.CategoricalDistribution(list(ops)),
                     "when": dist.CategoricalDistribution(list(whens)), "strength": dist.FloatDistribution(low, high)}
    params = {"first": start, "last": start + len(window) - 1, "op": setting.op, "when": setting.when,
              "strength": setting.strength}
    study.add_trial(create_trial(value=default.gain, params=params, distributions=distributions,
                                 constraints={"kl_over_budget": default.kl - max_kl}))


def _suggest(trial, layers: list[int], ops, whens, strength_range) -> Setting:
    first = trial.suggest_int("first", 0, len(layers) - 1)
    last = trial.suggest_int("last", 0, len(layers) - 1)
    low, high = min(first, last), max(first, last)
    op = trial.suggest_categorical("op", list(ops))
    when = trial.suggest_categorical("when", list(whens))
    strength = trial.suggest_float("strength", *strength_range)
    return Setting(op, when, tuple(layers[low : high + 1]), round(strength, 4))


def _show_best(bar, trials: list[Trial], max_kl: float) -> None:
    best = choose(trials, max_kl, against_default=False)
    if best is not None:
        bar.set_postfix_str(f"best gain {best.gain:+.3f} at KL {best.kl:.3f}")


def choose(trials: Sequence[Trial], max_kl: float, against_default: bool = True) -> Trial | None:
    """The trial with the largest gain within the budget (trials[0] is the default); with
    `against_default`, None unless it is not the default and moves further than the default does
    (or the default is over the budget) with a positive gain."""
    feasible = [t for t in trials if t.kl <= max_kl]
    if not feasible:
        return None
    best = max(feasible, key=lambda t: (t.gain, -t.kl))
    if not against_default:
        return best
    default = trials[0]
    if best is default or best.gain <= 0 or (default.kl <= max_kl and best.gain <= default.gain):
        return None
    return best


def pareto_front(trials: Sequence[Trial]) -> list[Trial]:
    """Trials no other trial beats on both gain (higher) and KL (lower), by increasing KL."""
    front = []
    for trial in sorted(trials, key=lambda t: (t.kl, -t.gain)):
        if not front or trial.gain > front[-1].gain:
            front.append(trial)
    return front


def report(model, vector, default: Setting, chosen: Setting, items, neutral, raw: bool, seed: int) -> Report:
    """Measure the default and the chosen settings on the report prompts, the default also at the
    chosen settings' KL (evaluate/tune_report.py)."""
    return report_at_equal_kl(lambda settings: measure(model, vector, settings, items, neutral, raw), default, chosen,
                              seed)


# -- the file -----------------------------------------------------------------------------------


def tuned_vector(vector: ControlVector, result: TuneResult, preset: str | None = None) -> ControlVector:
    """A copy of `vector` whose metadata holds the chosen settings (the tuned_* keys)."""
    if result.chosen is None:
        raise ValueError("nothing beat the default settings: there are no tuned settings to write")
    setting = result.chosen.setting
    metadata = dict(vector.metadata)
    metadata.update(tuned_op=setting.op, tuned_when=setting.when, tuned_layers=list(setting.layers),
                    tuned_strength=setting.strength, tuned_max_kl=result.max_kl, tuned_kl=result.chosen.kl)
    if result.report is not None:  # measured on every neutral position
        metadata.update(tuned_gain=result.report.tuned_move, tuned_kl=result.report.tuned_kl)
    if preset is not None:
        metadata["eval_preset"] = preset
    return ControlVector(dict(vector.directions), vector.model_hint, metadata)
