"""`ggsteer tune`: search layer window, op, position gating and strength under a KL budget, and save
the chosen settings in the vector file (evaluate/tune.py).

    ggsteer tune VECTOR.gguf [--max-kl 0.25] [--budget 40] [--preset NAME] [--plot FRONT.png]
                 [-o OUT.gguf [--force]] [--ops add,add_normalized,clamp] [--when all,generated] [--seed 0]

Decisions:
- Like calibrate: without -o the vector is rewritten in place (atomically); -o refuses an existing
  file without --force. Nothing is written when no candidate beats the default settings.
- The eval prompts are the preset's held-out ones (chosen as `ggsteer eval` chooses them), split
  in two: the search scores on one half, the result is reported on the other.
- Every output path is checked before the model loads.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ggsteer.cli.common import CliError, add_model_arguments, check_writable, load_model, output_path
from ggsteer.cli.evaluate import named_preset, resolve_preset
from ggsteer.evaluate import DEFAULT_MAX_KL
from ggsteer.evaluate.tune import (
    DEFAULT_BUDGET,
    DEFAULT_SEED,
    SEARCH_KL_STRIDE,
    SEARCH_OPS,
    SEARCH_WHEN,
    TuneResult,
    tune,
    tuned_vector,
)
from ggsteer.extras import require
from ggsteer.train import load_eval_prompts
from ggsteer.vectors import ControlVector


def add_parser(subparsers) -> None:
    """Register `ggsteer tune` on the `ggsteer` parser."""
    parser = subparsers.add_parser(
        "tune", help="search layers, op, gating and strength under a KL budget; save the best in the file",
        description="Search the layer window, the op (add, add_normalized, clamp), position gating (all tokens or "
                    "generated ones) and the strength that move the behaviour score furthest on held-out prompts "
                    "while the KL from the unsteered model on neutral text stays within --max-kl (optuna's TPE). "
                    "Prints the Pareto front of behaviour against KL and writes the chosen settings into the "
                    "vector's metadata; generate, chat, serve, export and bake then use them by default.",
    )
    parser.add_argument("vector", metavar="VECTOR.gguf", help="the control-vector file to tune (ggsteer train)")
    add_model_arguments(parser)
    parser.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                        help="largest mean KL(unsteered || steered) per token allowed, nats (default %(default)s)")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                        help=f"candidates to measure after the default settings (default {DEFAULT_BUDGET})")
    parser.add_argument("--preset", default=None,
                        help="preset whose held-out prompts to score (default: the one the vector records or matches)")
    parser.add_argument("--ops", default=",".join(SEARCH_OPS),
                        help="ops to search, comma separated (default: %(default)s)")
    parser.add_argument("--when", default=",".join(SEARCH_WHEN),
                        help="position gating to search, comma separated (default: %(default)s)")
    parser.add_argument("--kl-stride", type=int, default=SEARCH_KL_STRIDE,
                        help="the search reads the KL at every N-th neutral position; the report reads every "
                             "one (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampler seed (default %(default)s)")
    parser.add_argument("--raw", action="store_true",
                        help="strength is a plain coefficient (files without a trained gap)")
    parser.add_argument("--plot", default=None, metavar="FRONT.png", help="plot behaviour gain against KL (PNG)")
    parser.add_argument("-o", "--output", default=None, help="write the tuned vector here (default: rewrite VECTOR)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    parser.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    started = time.perf_counter()
    if not (math.isfinite(args.max_kl) and args.max_kl > 0):
        raise CliError(f"--max-kl must be a positive number, got {args.max_kl}")
    if args.budget < 1:
        raise CliError(f"--budget must be at least 1, got {args.budget}")
    if args.kl_stride < 1:
        raise CliError(f"--kl-stride must be at least 1, got {args.kl_stride}")
    target = output_path(args.output, args.force, "tuned vector") if args.output else Path(args.vector)
    check_writable(target, "the tuned vector")
    check_writable(args.plot, "--plot")
    if args.plot:
        require("matplotlib", "plot", "--plot")
    ops, whens = _names(args.ops, "--ops"), _names(args.when, "--when")
    vector = ControlVector.load(args.vector)
    preset = named_preset(args.preset, vector, Path(args.vector))
    model = load_model(args)
    vector.check_model(model)
    if preset is None:
        preset = resolve_preset(vector, model, Path(args.vector))
    result = tune(model, vector, load_eval_prompts(preset), max_kl=args.max_kl, budget=args.budget, ops=ops,
                  whens=whens, seed=args.seed, raw=args.raw, progress=True, kl_stride=args.kl_stride)
    print_result(result, preset)
    if result.chosen is not None:
        tuned_vector(vector, result, preset).save(target, overwrite=True)
        print(f"wrote the tuned settings to {target}; `ggsteer generate -v {target}` now uses them")
    if args.plot:
        from ggsteer.evaluate.tune_plot import plot_front

        plot_front(result, args.plot, title=f"{Path(args.vector).name} on {model.model_name}, preset {preset!r}")
        print(f"wrote {args.plot}", file=sys.stderr)
    print(f"(tune took {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def _names(text: str, flag: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise CliError(f"{flag} is empty: give a comma separated list")
    return names


def print_result(result: TuneResult, preset: str) -> None:
    if result.interrupted:
        print(f"stopped early: keeping the best of the {len(result.trials)} candidates measured")
    print(f"\n{len(result.trials)} candidates on {result.n_score} '{preset}' prompts (scoring split); "
          f"KL budget {result.max_kl:g}. Pareto front (gain vs KL; * within the budget):")
    print(f"{'#':>4} {'gain':>8} {'KL':>8}  settings")
    for trial in result.front:
        mark = "*" if trial.kl <= result.max_kl else " "
        note = "  (default)" if trial is result.default else ""
        print(f"{trial.number:>4} {trial.gain:>+8.3f} {trial.kl:>8.4f}{mark} {trial.setting.label}{note}")
    default = result.default
    print(f"\ndefault: {default.setting.label}: gain {default.gain:+.3f}, KL {default.kl:.4f}")
    if result.chosen is None:
        print(f"nothing beat the default settings within KL {result.max_kl:g}: the file is left as it is")
        return
    chosen, report = result.chosen, result.report
    print(f"chosen:  {chosen.setting.label}: gain {chosen.gain:+.3f}, KL {chosen.kl:.4f}")
    print(f"on the {result.n_report} held-out report prompts (not searched on), behaviour move over the plain model:")
    print(f"  default at its strength {result.default.setting.strength:g}: {report.default_move:+.3f} nats "
          f"(KL {report.default_kl:.4f})")
    print(f"  default at the tuned KL (strength {report.matched_strength:g}): {report.matched_move:+.3f} nats "
          f"(KL {report.matched_kl:.4f})")
    print(f"  tuned: {report.tuned_move:+.3f} nats (KL {report.tuned_kl:.4f})")
    print(f"ratio tuned / default at equal KL {report.ratio:.2f} (10-90% over resampled prompts "
          f"{report.ratio_spread[0]:.2f}..{report.ratio_spread[1]:.2f}); against the calibrated strength "
          f"{report.calibrated_ratio:.2f}")
    if report.tuned_move <= report.matched_move:
        print("warning: on the report prompts the tuned settings moved the behaviour score no further than the "
              "default at equal KL: the search fitted its scoring prompts; consider keeping the default")
