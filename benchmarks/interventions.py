"""Generation speed with each native intervention vs unsteered (CPU; CUDA when built and present).

    python benchmarks/interventions.py [--tokens 128] [--repeats 3] [--gpu-layers 0]

Every intervention runs in ggsteer's eval callback on layers 3-14 of the default model.
Target on CPU: tokens/s with the hook / unsteered >= 0.90.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _common import machine_line, print_table
from steer import tokens_per_second

from ggsteer import SteeredModel
from ggsteer.vector import ControlVector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args()
    model = SteeredModel(n_threads=os.cpu_count(), n_gpu_layers=args.gpu_layers)
    rng = np.random.default_rng(0)
    vector = ControlVector({il: rng.normal(size=model.n_embd).astype(np.float32) * 5 for il in range(1, model.n_layer)},
                           model.model_hint, {"unit": "gap"})
    layers = list(range(3, 15))
    cases = {
        "add (llama.cpp adapter)": dict(op="add"),
        "add, generated tokens only (hook)": dict(op="add", when="generated"),
        "ablate (hook)": dict(op="ablate"),
        "clamp (hook)": dict(op="clamp", strength=0.5),
        "add_normalized (hook)": dict(op="add_normalized"),
        "add if condition holds (hook)": dict(op="add", condition=(vector, -1.0, 2)),
    }
    tokens_per_second(model, 16)  # warm-up
    speeds: dict[str, list[float]] = {"unsteered": []} | {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        model.reset_control()
        speeds["unsteered"].append(tokens_per_second(model, args.tokens))
        for name, options in cases.items():
            options = dict(options)
            model.set_control(vector, options.pop("strength", 0.5), layers=layers, **options)
            speeds[name].append(tokens_per_second(model, args.tokens))
    model.reset_control()
    base = max(speeds["unsteered"])
    rows = [[name, f"{max(v):.1f}", f"{max(v) / base:.3f}"] for name, v in speeds.items()]
    device = "GPU" if args.gpu_layers else "CPU"
    print_table(
        f"Generation with interventions ({device}), {args.tokens} tokens, greedy, best of {args.repeats}, layers 3-14, "
        f"{model.model_name} ({machine_line()})",
        ["run", "tokens/s", "ratio to unsteered"],
        rows,
    )
    model.close()


if __name__ == "__main__":
    main()
