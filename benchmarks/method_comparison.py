"""Which training method steers best for its fluency cost? A strength sweep per method and preset.

    python benchmarks/method_comparison.py [--presets happy,calm,honest] [--methods mean_diff,pca_diff,pca_center,probe]
                                           [--strengths -0.2,-0.1,0.1,0.2,...,1.5] [--max-kl 0.25] [--json OUT]

Each method is trained on the same pairs (`preset_dataset(name, max_suffixes=40)`, default model)
and swept on its recommended layers. Strength 1.0 is each method's own mean gap per layer, so the
fair comparison is the behaviour gain for the same fluency cost: the gain at the calibrated
strength (the largest gain whose KL(unsteered || steered) on the neutral texts stays under
--max-kl, on `ggsteer calibrate`'s default grid 0.1:1.5:15), and the gain interpolated to
KL = --max-kl exactly, which does not depend on the grid. Steerability (the slope near 0) says how
much one unit of strength moves behaviour; wrong-way is the share of prompts that moved against
the push at the calibrated strength.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.cli.evaluate import parse_strengths
from ggsteer.evaluate import CALIBRATE_STRENGTHS, DEFAULT_MAX_KL, choose_calibration, strength_sweep
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector

# the steerability window's negative side, then calibrate's own grid
STRENGTHS = ",".join(f"{s:g}" for s in [-0.2, -0.1, *parse_strengths(CALIBRATE_STRENGTHS)])


def gain_at_kl(sweep, max_kl: float) -> float | None:
    """Behaviour gain interpolated linearly in KL to KL = max_kl along the positive strengths."""
    points = [(0.0, 0.0)] + [(p.kl, p.gain) for p in sweep.points if p.strength > 0]
    for (kl0, gain0), (kl1, gain1) in zip(points, points[1:]):
        if kl0 <= max_kl <= kl1 and kl1 > kl0:
            return gain0 + (gain1 - gain0) * (max_kl - kl0) / (kl1 - kl0)
    return None  # the grid never reaches the bound


def compare(model, preset: str, method: str, strengths: list[float], max_kl: float) -> dict:
    vector = ControlVector.train(model, preset_dataset(preset, max_suffixes=40), method=method)
    started = time.perf_counter()
    sweep = strength_sweep(model, vector, strengths, load_eval_prompts(preset), progress=True)
    seconds = time.perf_counter() - started
    try:
        chosen = choose_calibration([sweep], max_kl)
        point = next(p for p in sweep.points if p.strength == chosen.strength)
    except ValueError:
        chosen = point = None
    return {
        "preset": preset,
        "method": method,
        "steerability": sweep.steerability,
        "strength": None if chosen is None else chosen.strength,
        "gain": None if chosen is None else chosen.gain,
        "kl": None if chosen is None else chosen.kl,
        "gain_at_max_kl": gain_at_kl(sweep, max_kl),
        "wrong_way": None if point is None else point.wrong_way,
        "perplexity": None if point is None else point.perplexity,
        "baseline_perplexity": sweep.baseline_perplexity,
        "sweep_seconds": seconds,
        "sweep": sweep.to_dict(),
    }


def table_row(result: dict) -> list[str]:
    def show(key, fmt):
        return "-" if result[key] is None else format(result[key], fmt)

    return [result["preset"], result["method"], show("steerability", "+.2f"), show("strength", "g"),
            show("gain", "+.2f"), show("kl", ".3f"), show("gain_at_max_kl", "+.2f"), show("wrong_way", ".2f"),
            f"{show('perplexity', '.1f')} ({result['baseline_perplexity']:.1f})", f"{result['sweep_seconds']:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="happy,calm,honest")
    parser.add_argument("--methods", default="mean_diff,pca_diff,pca_center,probe")
    parser.add_argument("--strengths", default=STRENGTHS)
    parser.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL)
    parser.add_argument("--json", default=None, help="also write every sweep as JSON")
    args = parser.parse_args()

    strengths = [float(s) for s in args.strengths.split(",")]
    model = SteeredModel(n_ctx=2048, n_threads=os.cpu_count())
    results = []
    for preset in args.presets.split(","):
        for method in args.methods.split(","):
            results.append(compare(model, preset, method, strengths, args.max_kl))
            print(" | ".join(table_row(results[-1])), flush=True)
    header = ["preset", "method", "steerability (nats/unit)", "calibrated strength", "gain (nats)", "KL",
              f"gain at KL={args.max_kl:g}", "wrong-way", "perplexity (unsteered)", "sweep s"]
    print_table(f"Methods compared at KL <= {args.max_kl:g} ({machine_line()}; 14 held-out prompts per preset, "
                f"{len(strengths)} strengths)", header, [table_row(r) for r in results])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
