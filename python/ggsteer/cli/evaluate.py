"""`ggsteer eval` and `ggsteer calibrate`: strength sweeps of a vector file, and a calibrated strength.

    ggsteer eval VECTOR.gguf [--model PATH] [--strengths=-0.3:0.3:13] [--layers 3-14 | --layer-sweep]
                 [--preset NAME] [--json OUT.json] [--plot OUT.png] [--samples]
    ggsteer calibrate VECTOR.gguf [--max-kl 0.25] [-o OUT [--force]]  (and the same sweep options)

Decisions:
- Eval prompts: `--preset NAME`; without it, the preset the file records (`eval_preset`: written by
  the demo and by calibration), else the preset whose full dataset (as `ggsteer train --preset` builds it) has the
  vector's dataset hash; otherwise an error asks for --preset. Guessing "happy" would measure a calm
  vector on happy prompts and calibrate it on the wrong behaviour.
- `--layer-sweep`: the vector's recommended layers, then three equal windows over all its steerable
  layers (evaluate.layer_windows; Gemma 3 270M: 3-14, 1-6, 7-12, 13-17).
- `--json`/`--plot` replace existing files (they are reports); calibrate's `-o` refuses an existing
  file without `--force`, and without `-o` rewrites VECTOR in place atomically.
- Every output path is checked before the model is loaded, so a typo fails in a second, not after
  the sweep.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ggsteer.atomic_file import write_atomically
from ggsteer.cli.common import (
    CliError,
    add_model_arguments,
    check_writable,
    finite_number,
    layers_argument,
    load_model,
    write_output,
)
from ggsteer.cli.refusal import add_refusal_arguments, cmd_refusal
from ggsteer.cli.search import ranges_that_can_win, search_sweeps
from ggsteer.evaluate import (
    CALIBRATE_STRENGTHS,
    DEFAULT_MAX_KL,
    EVAL_STRENGTHS,
    calibrated_vector,
    choose_calibration,
    format_layers,
    infer_preset,
    layer_sweep,
    layer_windows,
    steered_layers,
)
from ggsteer.evaluate.ablation import ablation_view, asking_items
from ggsteer.extras import require
from ggsteer.train import UnknownPresetError, get_preset, load_eval_prompts
from ggsteer.vectors import ControlVector


def add_parser(subparsers) -> None:
    """Register `eval` and `calibrate` on the `ggsteer` parser."""
    evaluate = _sweep_parser(
        subparsers, "eval", EVAL_STRENGTHS, cmd_eval,
        help="sweep strengths: behaviour, wrong-way share, KL and perplexity (table, JSON, plot)",
        description="Measure a control vector at several strengths: behaviour score on held-out prompts "
                    "(log-prob gap of positive vs negative continuations), the share of prompts moving the "
                    "wrong way, and the fluency cost on neutral text (KL from the unsteered model, perplexity).",
    )
    evaluate.add_argument("--samples", action="store_true",
                          help="print a greedy completion of the first eval prompt per strength")
    evaluate.add_argument("--all-ranges", action="store_true",
                          help="with --layer-sweep: sweep every range, not only those that can win")
    evaluate.add_argument("--ablation", action="store_true",
                          help="also measure ablate and clamp at -1, 0, +1 gap: fluency cost, behaviour left on "
                               "prompts that ask for it, and how much the projections collapse")
    add_refusal_arguments(evaluate)

    calibrate = _sweep_parser(
        subparsers, "calibrate", CALIBRATE_STRENGTHS, cmd_calibrate,
        help="pick the strength with the largest behaviour gain under a KL bound and save it in the file",
        description="Sweep positive strengths (toward the positive persona), pick the one with the largest behaviour "
                    "gain whose KL from the unsteered model stays under --max-kl, and write it into the vector's "
                    "metadata as recommended_strength (and recommended_layers); generate and chat use it by default.",
    )
    calibrate.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                           help="largest mean KL(unsteered || steered) per token allowed, nats "
                                f"(default {DEFAULT_MAX_KL:g})")
    calibrate.add_argument("-o", "--output", default=None,
                           help="write the calibrated vector here (default: rewrite VECTOR in place)")
    calibrate.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    calibrate.add_argument("--full-sweep", action="store_true",
                           help="measure every strength of --strengths on every neutral position (for the plot) "
                                "instead of searching the grid for the strength (the same choice, a fraction of "
                                "the work)")


def _sweep_parser(subparsers, name: str, default_strengths: str, func, **text):
    parser = subparsers.add_parser(name, **text)
    parser.add_argument("vector", metavar="VECTOR.gguf", help="the control-vector file (ggsteer train)")
    add_sweep_arguments(parser, default_strengths)
    parser.set_defaults(func=func)
    return parser


def add_sweep_arguments(parser, default_strengths: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--strengths", default=default_strengths,
                        help=f"A:B:N (N evenly spaced values from A to B inclusive) or a comma list "
                             f"(default {default_strengths}); "
                             "write --strengths=-0.5:0.5:5 when the first value is negative")
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layers", default=None,
                        help="layers to steer, e.g. 3-14 (default: the vector's recommended layers)")
    layers.add_argument("--layer-sweep", action="store_true",
                        help="also sweep windows over the depth: recommended layers plus three equal windows over "
                             "all layers")
    parser.add_argument("--preset", default=None,
                        help="preset whose held-out prompts to score (default: the one the vector records or "
                             "matches; see `ggsteer presets`)")
    parser.add_argument("--raw", action="store_true",
                        help="strength is a plain coefficient (files without a trained gap)")
    parser.add_argument("--json", default=None, metavar="OUT.json", help="write every number (and samples) as JSON")
    parser.add_argument("--plot", default=None, metavar="OUT.png", help="plot behaviour and KL against strength (PNG)")


# -- argument checks ----------------------------------------------------------------------------


def parse_strengths(text: str) -> list[float]:
    """"A:B:N" -> N evenly spaced values from A to B inclusive; "a,b,c" -> those values. Sorted, unique."""
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise CliError(f"bad --strengths {text!r}: use A:B:N (e.g. -0.3:0.3:13) or a comma list")
        start, stop, count = _number(parts[0], text), _number(parts[1], text), _count(parts[2], text)
        if count == 1 and start != stop:
            raise CliError(f"bad --strengths {text!r}: N=1 gives one value, so A and B must be equal")
        values = np.linspace(start, stop, count)
    else:
        values = [_number(part, text) for part in text.split(",") if part.strip()]
        if not values:
            raise CliError(f"empty --strengths {text!r}: give A:B:N or a comma list of numbers")
    # rounding hides linspace's float noise (0.049999999 -> 0.05); adding 0.0 turns -0.0 into 0.0
    return sorted({round(float(v), 10) + 0.0 for v in values})


def _number(text: str, spec: str) -> float:
    return finite_number(text, f"bad --strengths {spec!r}: {text.strip()!r} is not a number",
                         f"bad --strengths {spec!r}: strengths must be finite")


def _count(text: str, spec: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise CliError(f"bad --strengths {spec!r}: N must be a whole number, got {text.strip()!r}") from None
    if count < 1:
        raise CliError(f"empty --strengths range {spec!r}: N is {count}, so there is nothing to evaluate "
                       "(N must be at least 1)")
    return count


# -- the shared sweep ---------------------------------------------------------------------------


@dataclass
class SweepJob:
    vector_path: Path
    vector: object  # ControlVector
    model: object  # SteeredModel
    preset: str
    eval_items: list[dict]
    strengths: list[float]
    layer_ranges: list  # each a list of layers, or None for the vector's recommended layers


def prepare_sweep(args) -> SweepJob:
    """Check the arguments (cheap checks first), load the vector and the model, choose prompts and layers."""
    strengths = parse_strengths(args.strengths)
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    if args.plot:
        require("matplotlib", "plot", "--plot")  # a missing extra fails now, not after the sweep
    layers = layers_argument(args.layers)
    vector_path = Path(args.vector)
    vector = ControlVector.load(vector_path)
    preset = named_preset(args.preset, vector, vector_path)  # an unknown name fails before the model loads
    model = load_model(args)
    vector.check_model(model)
    if preset is None:
        preset = resolve_preset(vector, model, vector_path)
    ranges = layer_windows(vector, model.n_layer) if args.layer_sweep else [layers]
    for layer_range in ranges:
        steered_layers(model, vector, layer_range, args.raw)  # a bad range fails before any sweep
    return SweepJob(vector_path, vector, model, preset, load_eval_prompts(preset), strengths, ranges)


def named_preset(name: str | None, vector, vector_path: Path) -> str | None:
    """--preset, else the preset the file records (`eval_preset`: the demo, training from a preset,
    calibration); both checked against the built-in presets. None when neither names one."""
    if name is not None:
        return get_preset(name).name
    recorded = vector.metadata.get("eval_preset")
    if recorded is None:
        return None
    try:
        return get_preset(str(recorded)).name
    except UnknownPresetError as error:
        raise CliError(f"{vector_path} records {error.args[0]}: pass --preset NAME") from None


def resolve_preset(vector, model, vector_path: Path) -> str:
    """The preset whose full dataset has the vector's dataset hash (needs the model's chat template)."""
    inferred = infer_preset(vector, model.chat_instruction_formatter())
    if inferred is None:
        raise CliError(
            f"cannot tell which preset {vector_path} was trained on (the file does not name one and its dataset "
            f"hash matches no built-in preset): pass --preset NAME (see `ggsteer presets`)"
        )
    print(f"evaluating on the {inferred!r} preset's held-out prompts", file=sys.stderr)
    return inferred


def run_sweeps(job: SweepJob, raw: bool, samples: bool = False) -> list:
    return layer_sweep(job.model, job.vector, job.strengths, job.eval_items, job.layer_ranges, raw=raw,
                       samples=samples, progress=True)


# -- output -------------------------------------------------------------------------------------


def print_sweeps(sweeps, samples: bool = False) -> None:
    for sweep in sweeps:
        slope = ("unknown (it needs two different strengths)" if math.isnan(sweep.steerability)
                 else f"{sweep.steerability:+.3g} nats per unit strength")
        print(f"\n{sweep.label}: steerability {slope}; "
              f"unsteered behaviour {sweep.baseline_behaviour:+.3f}, perplexity {sweep.baseline_perplexity:.2f}")
        print(f"{'strength':>9} {'behaviour':>10} {'gain':>8} {'wrong-way':>10} {'KL':>9} {'perplexity':>11}")
        for p in sweep.points:
            wrong = "-" if p.wrong_way is None else f"{p.wrong_way:.2f}"
            print(f"{p.strength:>+9.3g} {_cell(p.behaviour, '+10.3f')} {_cell(p.gain, '+8.3f')} {wrong:>10} "
                  f"{_cell(p.kl, '9.4f')} {_cell(p.perplexity, '11.2f')}")
        if samples:
            print(f"\n  samples ({sweep.label}, greedy):")
            print(f"  {'unsteered':>9} | {_one_line(sweep.baseline_sample)}")
            for p in sweep.points:
                print(f"  {p.strength:>+9.3g} | {_one_line(p.sample)}")
    print()


def _cell(value: float, spec: str) -> str:
    """A number, or "-" right-aligned where the search did not need it."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()))
    return f"{'-':>{width}}" if math.isnan(value) else format(value, spec)


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()) or "(nothing)"


def write_reports(args, job: SweepJob, sweeps, seconds: float, calibration=None) -> None:
    from ggsteer.evaluate.plot import (
        plot_sweeps,  # matplotlib: the optional [plot] extra
    )

    if args.json:
        report = {
            "vector": str(job.vector_path),
            "model": job.model.model_name,
            "model_path": str(job.model.model_path),
            "preset": job.preset,
            "n_eval_prompts": len(job.eval_items),
            "strengths": job.strengths,
            "seconds": round(seconds, 2),
            "sweeps": [sweep.to_dict() for sweep in sweeps],
            "calibration": None if calibration is None else asdict(calibration),
        }
        text = json.dumps(_finite(report), indent=2) + "\n"
        write_output(args.json, "--json",
                     lambda: write_atomically(args.json, lambda temp: Path(temp).write_text(text, encoding="utf-8"),
                                              overwrite=True))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        title = f"{job.vector_path.name} on {job.model.model_name}, preset {job.preset!r}"
        write_output(args.plot, "--plot", lambda: write_atomically(
            args.plot, lambda temp: plot_sweeps(sweeps, temp, title=title, calibration=calibration), overwrite=True))
        print(f"wrote {args.plot}", file=sys.stderr)


def _finite(value):
    """NaN/inf -> None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# -- commands -----------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    if args.refusal:
        return cmd_refusal(args)
    started = time.perf_counter()
    job = prepare_sweep(args)
    if args.layer_sweep and not args.all_ranges:
        job.layer_ranges = ranges_that_can_win(job, args.raw, parse_strengths(CALIBRATE_STRENGTHS))
    sweeps = run_sweeps(job, args.raw, samples=args.samples)
    seconds = time.perf_counter() - started
    print(f"{job.vector_path.name}: {len(job.eval_items)} '{job.preset}' prompts, {len(job.strengths)} strengths")
    print_sweeps(sweeps, samples=args.samples)
    if job.vector.tuned is not None:
        print_tuned(job, args.raw)
    write_reports(args, job, sweeps, seconds)
    if args.ablation:
        print_ablation(job, args.layers)
    print(f"(eval took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def print_tuned(job: SweepJob, raw: bool) -> None:
    """The file's tuned settings beside its default (recommended) ones, on every eval prompt."""
    from ggsteer.evaluate.fluency import neutral_tokens
    from ggsteer.evaluate.tune import Setting, default_setting, measure

    tuned = job.vector.tuned
    settings = [default_setting(job.model, job.vector),
                Setting(tuned.op, tuned.when, tuple(tuned.layers), tuned.strength)]
    moves, kls = measure(job.model, job.vector, settings, job.eval_items, neutral_tokens(job.model, None), raw)
    print(f"tuned against default on all {len(job.eval_items)} eval prompts (the tune scored on half of them):")
    for name, setting, move, kl in zip(("default", "tuned"), settings, moves, kls):
        label = f"{name} settings:"
        print(f"  {label:<18}{setting.label}: behaviour move {move.mean():+.3f} nats, KL {kl:.4f}")
    print()


def print_ablation(job: SweepJob, layers_text: str | None) -> None:
    """The ablation view: what ablate and clamp cost in fluency and how much behaviour they remove."""
    layers = layers_argument(layers_text)
    asking = asking_items(job.preset, job.eval_items)
    opposite = asking_items(job.preset, job.eval_items, side="negative")
    print(f"\nablation view ({len(asking)} prompts asking for '{job.preset}' (+) and as many for its opposite (-); "
          "plain: the eval prompts under the op; recovery: share of the persona's push taken back, - where it "
          "does not move the score; gap left: share of (asking+ - asking-) that survives)")
    print(f"{'op':<10}{'KL':>8}{'ppl x':>8}{'plain':>9}{'asking+':>9}{'ablated':>9}{'recov+':>8}{'asking-':>9}"
          f"{'ablated':>9}{'recov-':>8}{'gap left':>9}{'spread /':>10}")
    for op, strength in (("ablate", 0.0), ("clamp", -1.0), ("clamp", 1.0)):
        view = ablation_view(job.model, job.vector, job.eval_items, asking, opposite=opposite, op=op,
                             strength=strength, layers=layers)
        label = op if op == "ablate" else f"clamp {strength:+g}"
        shrink = min(view.spread_shrink.values())
        print(f"{label:<10}{view.kl:>8.3f}{view.perplexity_ratio:>8.2f}{view.neutral_ablated:>9.3f}"
              f"{view.asking_behaviour:>9.3f}{view.ablated_behaviour:>9.3f}{_share(view.recovery):>8}"
              f"{view.opposite_behaviour:>9.3f}{view.opposite_ablated:>9.3f}{_share(view.opposite_recovery):>8}"
              f"{_share(view.gap_left):>9}{shrink:>10.3g}")
    print(f"(plain eval prompts unsteered: {view.neutral_behaviour:.3f})")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def cmd_calibrate(args) -> int:
    started = time.perf_counter()
    if not (math.isfinite(args.max_kl) and args.max_kl > 0):
        raise CliError(f"--max-kl must be a positive number, got {args.max_kl}")
    target = Path(args.output) if args.output else Path(args.vector)
    if args.output and target.exists() and not args.force:
        raise CliError(f"{target} already exists: pass --force to overwrite it")
    check_writable(target, "the calibrated vector")
    if not any(s > 0 for s in parse_strengths(args.strengths)):
        raise CliError(
            f"--strengths {args.strengths!r} has no positive strength: calibration picks one toward the positive "
            "persona"
        )
    job = prepare_sweep(args)
    if args.full_sweep:
        sweeps = run_sweeps(job, args.raw)
        print_sweeps(sweeps)
        calibration = choose_calibration(sweeps, args.max_kl)
    else:
        sweeps, calibration = search_sweeps(job, args.raw, args.max_kl)
        print_sweeps(sweeps)
    calibrated_vector(job.vector, calibration, job.preset).save(target, overwrite=True)
    seconds = time.perf_counter() - started
    print(f"calibrated: strength {calibration.strength:g} on layers {format_layers(calibration.layers)} "
          f"(behaviour gain {calibration.gain:+.3f} nats, KL {calibration.kl:.4f} <= {calibration.max_kl:g})")
    print(f"wrote recommended_strength and recommended_layers to {target}; "
          f"`ggsteer generate -v {target}` now uses them")
    write_reports(args, job, sweeps, seconds, calibration)
    return 0
