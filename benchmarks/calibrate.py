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

    python benchmarks/calibrate.py --search VECTOR.gguf[,VECTOR2.gguf...] [--presets happy,calm,honest]
                                   [--model PATH] [--rounds 1] [--gpu-layers N]

`ggsteer calibrate` as it was (the full sweep of 15 strengths, `choose_calibration`) against the search
(evaluate/strength_search.py), paired and alternating on each vector: seconds, logits rows and tokens
(which do not depend on the machine's load), and the two calibrated strengths.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

from _common import machine_line, paired_times, print_table, ratio_cells, seconds

from ggsteer import SteeredModel
from ggsteer.cli.evaluate import parse_strengths
from ggsteer.evaluate import DEFAULT_MAX_KL, choose_calibration, layer_sweep, strength_sweep
from ggsteer.evaluate.behaviour import behaviour_units
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.settings import settings_per_strength
from ggsteer.evaluate.side_by_side import SideBySide, run_side_by_side
from ggsteer.evaluate.strength_search import Work, search_calibration
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector


def sweep_units(model, vector, strengths, items):
    """The settings and units `strength_sweep` decodes (setting 0: the plain model)."""
    settings = [[], *settings_per_strength(model, vector, strengths, None, False)]
    fluency = FluencyTally(neutral_tokens(model, None), len(settings) - 1)
    units, _ = behaviour_units(model, len(settings), items)
    return settings, fluency.units + units


def floor(model, units, _settings):
    """The same packed decodes, unsteered, nothing scored."""
    idle = [dataclasses.replace(unit, setting=0, consume=lambda _pieces: None) for unit in units]
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
    parser.add_argument("--search", default=None, help="comma list of vector files: full sweep vs search")
    parser.add_argument("--presets", default="happy,calm,honest", help="with --search: each vector's preset")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL)
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (llama.cpp n_gpu_layers)")
    args = parser.parse_args()
    if args.search:
        return search_table(args)
    model = SteeredModel(args.model, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
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


def search_table(args) -> int:
    model = SteeredModel(args.model, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
    grid = parse_strengths(args.strengths)
    rows = []
    for index, (path, preset) in enumerate(zip(args.search.split(","), args.presets.split(","))):
        vector = ControlVector.load(path)
        items = load_eval_prompts(preset)
        settings, units = sweep_units(model, vector, grid, items)
        full_rows, full_tokens = sum(u.n_outputs for u in units), sum(u.n_rows for u in units)
        found, times = {}, {"full": [], "search": []}

        def full(vector=vector, items=items, found=found):
            (sweep,) = layer_sweep(model, vector, grid, items, [None])
            found["full"] = choose_calibration([sweep], args.max_kl)

        def search(vector=vector, items=items, found=found):
            found["work"] = work = Work()
            found["search"] = search_calibration(model, vector, items, grid, args.max_kl, work=work)[1]

        for r in range(args.rounds):
            for name, fn in (("full", full), ("search", search))[:: 1 if (r + index) % 2 == 0 else -1]:
                times[name].append(seconds(fn))
        ratios = [b / a for a, b in zip(times["full"], times["search"])]
        work = found["work"]
        rows.append([preset, f"{found['full'].strength:g} / {found['search'].strength:g}",
                     f"{full_rows} / {work.logits_rows} ({work.logits_rows / full_rows:.3f})",
                     f"{full_tokens} / {work.tokens}", f"{statistics.median(times['full']):.1f} / "
                     f"{statistics.median(times['search']):.1f}", *ratio_cells(ratios)])
        print(rows[-1], flush=True)
    print_table(
        f"calibrate on {model.model_name}: full sweep of {len(grid)} strengths vs the search, max KL {args.max_kl:g}, "
        f"{args.rounds} paired rounds ({machine_line()}, load {os.getloadavg()[0]:.2f}, "
        f"n_gpu_layers {args.gpu_layers})",
        ["preset", "strength full / search", "logits rows full / search (ratio)", "tokens full / search",
         "s full / search (median)", "time ratio", "range"],
        rows,
    )
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
