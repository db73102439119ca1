"""Does steering the last block buy anything? Strength sweeps with and without it.

    python benchmarks/last_layer.py [--preset happy] [--max-kl 0.25]

Training the last layer is not free: llama.cpp keeps only output rows in the last block, so its
captured rows must be logits outputs, and each runs the output head (benchmarks/train.py shows the
cost). llama.cpp's cvector-generator never trains it (it measures blocks 0..n-2); repeng does. This
trains a mean_diff vector on every layer 1..n_layer-1 of the preset and sweeps the calibration
strengths (0.1..1.5) on layer ranges that differ only by the last layer. Per range: the largest
behaviour gain whose KL <= --max-kl (what `ggsteer calibrate` would pick), the gain and KL at the
largest strength, and the steerability (nats per unit strength around 0).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _common import machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.evaluate import format_layers, strength_sweep
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector

STRENGTHS = list(np.round(np.linspace(0.1, 1.5, 15), 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="happy")
    parser.add_argument("--max-kl", type=float, default=0.25)
    parser.add_argument("--strengths", type=float, nargs="+", default=STRENGTHS, help="default: calibrate's 0.1..1.5")
    parser.add_argument("--suffixes", type=int, default=None,
                        help="train on the preset's first N suffixes (default all)")
    args = parser.parse_args()
    model = SteeredModel(n_threads=os.cpu_count())
    last = model.n_layer - 1
    pairs = preset_dataset(args.preset, max_suffixes=args.suffixes)
    vector = ControlVector.train(model, pairs, method="mean_diff", layers=range(1, model.n_layer), progress=False)
    items = load_eval_prompts(args.preset)
    ranges = [[last - 1], [last], list(range(last - 4, last)), list(range(last - 4, last + 1))]
    rows = []
    for layers in ranges:
        sweep = strength_sweep(model, vector, [0.0, *args.strengths], items, layers=layers)
        fitting = [p for p in sweep.points if 0 < p.strength and p.kl <= args.max_kl and p.gain > 0]
        best = max(fitting, key=lambda p: p.gain) if fitting else None
        top = sweep.points[-1]
        rows.append([format_layers(layers), f"{sweep.steerability:.3f}",
                     f"{best.strength:g} / {best.gain:+.3f} / {best.kl:.3f}" if best else "none",
                     f"{top.gain:+.3f} / {top.kl:.3f}"])
    print_table(
        f"{args.preset} mean_diff vector on {model.model_name}: layer ranges with and without the last layer ({last}), "
        f"{len(items)} eval prompts ({machine_line()})",
        ["layers", "steerability", f"best strength / gain / KL with KL <= {args.max_kl:g}",
         f"gain / KL at strength {args.strengths[-1]:g}"],
        rows,
    )
    model.close()


if __name__ == "__main__":
    main()
