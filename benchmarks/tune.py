"""`ggsteer tune` on several (model, preset) vectors: does the tuned setting move behaviour further
than the default at equal KL?

    python benchmarks/tune.py VECTOR.gguf[,VECTOR2.gguf...] [--presets happy,calm,honest] [--model PATH]
                              [--budget 40] [--max-kl 0.25] [--threads 2] [--samples 40] [--json OUT.json]

Each vector (trained with `ggsteer train --preset P` and calibrated with `ggsteer calibrate`) is tuned
with the library's defaults (evaluate/tune.py), one after the other on the same model. Per vector the
table gives, on the report prompts (never searched on): the default's move at its calibrated strength
and KL, the default's move scaled to the tuned KL, the tuned move and KL, the ratio tuned / default
at equal KL with its 10th-90th percentile over resampled prompts, the ratio against the calibrated
strength, the tuned settings and the seconds the tune took (search and report). With --samples N,
the first report prompt is completed greedily (N tokens) unsteered, with the default and with the
tuned settings.

    python benchmarks/tune.py VECTOR.gguf --presets happy --probe 2.0

The probe instead measures, on all the preset's prompts, the default and plain addition on each
single steerable layer at the given strength: behaviour move, KL (every 4th neutral position, as the
search reads it) and move / sqrt(KL), the move per unit of fluency cost. For small pushes the move
grows as the strength and the KL as its square, so that quotient does not depend on the strength: it
says which layers steer most per unit of KL, and whether any beats the default's window.

    python benchmarks/tune.py VECTOR.gguf --presets happy --positions

The position probe measures the default settings' KL at each single position of the neutral texts
(0, 1, 2, ... up to the shortest text): whether the fluency cost sits at some positions, such as the
first ones after the start, that a gating could leave alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from _common import machine_line, print_table
from tqdm.auto import tqdm

from ggsteer import SteeredModel
from ggsteer.evaluate import DEFAULT_MAX_KL
from ggsteer.evaluate.behaviour import READABLE_GREEDY
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.side_by_side import run_side_by_side
from ggsteer.evaluate.tune import (
    CANDIDATES_PER_PASS,
    DEFAULT_BUDGET,
    SEARCH_KL_STRIDE,
    Setting,
    default_setting,
    interventions_of,
    measure,
    split_prompts,
    steerable_layers,
    tune,
)
from ggsteer.train import load_eval_prompts
from ggsteer.vectors import ControlVector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vectors", help="comma separated control-vector files, one per preset")
    parser.add_argument("--presets", default="happy,calm,honest", help="the preset of each vector, in order")
    parser.add_argument("--model", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    parser.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="greedy tokens per sample (0: none)")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--probe", type=float, default=None, help="single-layer probe at this strength instead")
    parser.add_argument("--positions", action="store_true", help="the default's KL at each position instead")
    args = parser.parse_args()
    paths, presets = args.vectors.split(","), args.presets.split(",")
    if len(paths) != len(presets):
        parser.error(f"{len(paths)} vectors but {len(presets)} presets")
    model = SteeredModel(args.model, n_threads=args.threads, n_threads_batch=args.threads)
    print(f"{machine_line()}; {model.model_name}; budget {args.budget}, KL budget {args.max_kl:g}", file=sys.stderr)
    if args.probe is not None:
        for path, preset in zip(paths, presets):
            probe(model, ControlVector.load(path), preset, args.probe)
        return 0
    if args.positions:
        for path, preset in zip(paths, presets):
            kl_by_position(model, ControlVector.load(path), preset)
        return 0
    rows, records = [], []
    for path, preset in zip(paths, presets):
        record = tune_one(model, ControlVector.load(path), preset, args)
        records.append({"vector": path, **record})
        rows.append(row_of(preset, record))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print_table(f"tune on {model.model_name} ({machine_line()}), budget {args.budget}, KL <= {args.max_kl:g}",
                ["preset", "default (calibrated)", "default at tuned KL", "tuned", "ratio at equal KL [10-90%]",
                 "ratio vs calibrated", "tuned settings", "tune s"], rows)
    for record in records:
        for name, text in record.get("samples", {}).items():
            print(f"{record['preset']} {name}: {text!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return 0


def tune_one(model, vector, preset: str, args) -> dict:
    items = load_eval_prompts(preset)
    started = time.perf_counter()
    result = tune(model, vector, items, max_kl=args.max_kl, budget=args.budget, progress=True)
    seconds = time.perf_counter() - started
    record = {"preset": preset, "seconds": seconds, "candidates": len(result.trials),
              "default": result.default.setting.label, "default_search_kl": result.default.kl,
              "chosen": result.chosen.setting.label if result.chosen else None,
              "report": asdict(result.report) if result.report else None}
    if args.samples and result.chosen is not None:
        prompt = split_prompts(items)[1][0]["prompt"]
        settings = {"unsteered": None, "default": result.default.setting, "tuned": result.chosen.setting}
        controls = [None if s is None else interventions_of(model, vector, s) for s in settings.values()]
        texts = model.generate_batch([prompt] * len(controls), controls, args.samples, **asdict(READABLE_GREEDY))
        record["samples"] = {"prompt": prompt, **dict(zip(settings, texts))}
    return record


def probe(model, vector, preset: str, strength: float) -> None:
    default = default_setting(model, vector)
    settings = [default] + [Setting("add", "all", (il,), strength) for il in steerable_layers(model, vector)]
    neutral = neutral_tokens(model, None)
    rows = []
    for start in tqdm(range(0, len(settings), CANDIDATES_PER_PASS), desc="probe", unit="pass"):
        chunk = settings[start : start + CANDIDATES_PER_PASS]
        moves, kls = measure(model, vector, chunk, load_eval_prompts(preset), neutral, stride=SEARCH_KL_STRIDE)
        for setting, move, kl in zip(chunk, moves, kls):
            efficiency = move.mean() / math.sqrt(kl) if kl > 0 else math.nan
            rows.append([setting.label, f"{move.mean():+.2f}", f"{kl:.4f}", f"{efficiency:.1f}"])
    print_table(f"single-layer probe, {preset} on {model.model_name} ({machine_line()})",
                ["setting", "move", "KL", "move / sqrt(KL)"], rows)


def kl_by_position(model, vector, preset: str) -> None:
    default = default_setting(model, vector)
    neutral = neutral_tokens(model, None)
    control = [[], [interventions_of(model, vector, default)]]
    lengths = [len(tokens) for tokens in neutral]
    rows = [["all", f"{position_kl(model, control, neutral, 1, 0):.4f}"]]
    for position in tqdm(range(min(lengths)), desc="positions", unit="position"):
        # a stride past the longest text reads that one position of each text
        rows.append([str(position), f"{position_kl(model, control, neutral, max(lengths) + 1, position):.4f}"])
    print_table(f"KL by position, {preset} {default.label} on {model.model_name} ({machine_line()})",
                ["position", "mean KL"], rows)


def position_kl(model, control, neutral, stride: int, offset: int) -> float:
    """Mean KL at positions offset, offset + stride, ... of each neutral text."""
    tally = FluencyTally(neutral, 1, stride, offset)
    run_side_by_side(model, control, tally.units)
    return tally.costs()[0][0].kl


def row_of(preset: str, record: dict) -> list[str]:
    report = record["report"]
    if report is None:
        return [preset, record["default"], "-", "nothing beat the default", "-", "-", "-", f"{record['seconds']:.0f}"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    low, high = report["ratio_spread"]
    return [preset, f"{mean(report['default_moves']):+.2f} at KL {report['default_kl']:.3f}",
            f"{mean(report['matched_moves']):+.2f} at KL {report['matched_kl']:.3f} (s {report['matched_strength']:g})",
            f"{mean(report['tuned_moves']):+.2f} at KL {report['tuned_kl']:.3f}",
            f"{report['ratio']:.2f} [{low:.2f}-{high:.2f}]", f"{report['calibrated_ratio']:.2f}", record["chosen"],
            f"{record['seconds']:.0f}"]


if __name__ == "__main__":
    sys.exit(main())
