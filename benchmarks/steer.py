"""Generation speed with additive steering (llama.cpp's control-vector adapter) vs unsteered.

    python benchmarks/steer.py [--tokens 64] [--rounds 7]

Target: steered / unsteered tokens/s >= 0.98.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from _common import machine_line, paired_ratios, print_table, ratio_cells, tokens_per_second

from ggsteer import SteeredModel
from ggsteer.vectors import ControlVector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = SteeredModel(n_threads=os.cpu_count())
    rng = np.random.default_rng(0)
    # a vector of realistic size: 0.5 x a unit direction scaled to each layer's typical gap
    vector = ControlVector({il: rng.normal(size=model.n_embd).astype(np.float32) * 5 for il in range(1, model.n_layer)},
                           model.model_hint, {"unit": "gap"})

    def measure(case: str | None) -> float:
        if case is None:
            model.reset_control()
        else:
            model.set_control(vector, 0.5, layers=range(3, 15))
        return tokens_per_second(model, args.tokens)

    tokens_per_second(model, 16)  # warm-up
    ratios, speeds = paired_ratios(measure, ["steered"], args.rounds)
    model.reset_control()
    print_table(
        f"Generation, {args.tokens} tokens, greedy, median of {args.rounds} paired rounds on {model.model_name} "
        f"({machine_line()})",
        ["run", "tokens/s (median)", "ratio (median)", "ratio range"],
        [["unsteered", f"{statistics.median(speeds[None]):.1f}", "1.000", "-"],
         ["steered (cvec adapter, layers 3-14)", f"{statistics.median(speeds['steered']):.1f}",
          *ratio_cells(ratios["steered"])]],
    )
    model.close()


if __name__ == "__main__":
    main()
