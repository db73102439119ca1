"""`ggsteer calibrate`'s sweep decoded side by side, against its floor and against one setting per decode.

    python benchmarks/calibrate.py [--vector happy.gguf] [--strengths 0.1:1.5:15] [--rounds 2]

The sweep is what `ggsteer calibrate` computes: `strength_sweep` of the vector on the happy preset's
held-out prompts (behaviour) and the shipped neutral texts (KL, perplexity), at 15 strengths plus the
plain model. Without --vector the happy preset is trained first (default method). Timed, in paired
rounds (each right after its own floor, the order of the pairs rotating each round):
- side by side: the library (`strength_sweep`), every setting's units packed into shared decodes;
- one setting per decode: the same units and scoring, but each setting decoded on its own, the
  layout of the sweep before it ran side by side;
- floor: the same units (the same tokens, rows and logits rows, packed the same way) decoded with
  no steering and no scoring: what llama.cpp alone needs to produce those logits.
The table gives the median ratio to the floor with its range, and the work: decodes, tokens, logits rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from _common import machine_line, paired_times, print_table, ratio_cells

from ggsteer import SteeredModel
from ggsteer.cli.evaluate import parse_strengths
from ggsteer.evaluate import strength_sweep
from ggsteer.evaluate.behaviour import behaviour_units
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.settings import settings_per_strength
from ggsteer.evaluate.side_by_side import SideBySide, run_side_by_side
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector


def sweep_units(model, vector, strengths, items):
    """The settings and units `strength_sweep` decodes (setting 0: the plain model)."""
    settings = [[], *settings_per_strength(model, vector, strengths, None, False)]
    fluency = FluencyTally(neutral_tokens(model, None), len(settings) - 1)
    units, _ = behaviour_units(model, len(settings), items)
    return settings, fluency.units + units


def floor(model, units, settings):
    """The same packed decodes, unsteered, nothing scored."""
    idle = [dataclasses.replace(unit, setting=0, consume=lambda pieces: None) for unit in units]
    with SideBySide(model, [[]]) as runner:
        groups = runner.pack(idle)
        for group in groups:
            runner.decode(group)
    return groups


def one_setting_per_decode(model, vector, strengths, items):
    settings, units = sweep_units(model, vector, strengths, items)
    for setting in range(len(settings)):
        run_side_by_side(model, settings, [u for u in units if u.setting == setting])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vector", default=None, help="a happy vector file (default: train one now)")
    parser.add_argument("--strengths", default="0.1:1.5:15")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    model = SteeredModel(n_threads=args.threads)
    if args.vector:
        vector = ControlVector.load(args.vector)
    else:
        print("training the happy preset ...", file=sys.stderr)
        vector = ControlVector.train(model, preset_dataset("happy"))
    strengths = parse_strengths(args.strengths)
    items = load_eval_prompts("happy")
    settings, units = sweep_units(model, vector, strengths, items)
    groups = floor(model, units, settings)  # warm-up, and the packing the table reports
    n_tokens = sum(u.n_rows for u in units)
    n_outputs = sum(u.n_outputs for u in units)
    results = paired_times({
        "side by side (library)": (lambda: floor(model, units, settings),
                                   lambda: strength_sweep(model, vector, strengths, items)),
        "one setting per decode": (lambda: floor(model, units, settings),
                                   lambda: one_setting_per_decode(model, vector, strengths, items)),
    }, args.rounds)
    rows = []
    for name, (ratios, floor_s, case_s) in results.items():
        rows.append([name, f"{min(case_s):.1f}", f"{min(floor_s):.1f}", *ratio_cells(ratios)])
    print(machine_line())
    print_table(
        f"calibration sweep: {len(strengths)} strengths + the plain model, {len(items)} eval prompts, "
        f"{len(units)} units = {n_tokens} tokens, {n_outputs} logits rows, {len(groups)} decodes side by side "
        f"(rounds: {args.rounds})",
        ["layout", "seconds (best)", "floor seconds (best)", "ratio to floor (median)", "range"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
