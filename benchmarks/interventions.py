"""Generation speed with each native intervention vs unsteered (CPU; CUDA when built and present).

    python benchmarks/interventions.py [--tokens 64] [--rounds 7] [--decodes 400] [--gpu-layers 0]

Every intervention runs in ggsteer's eval callback on layers 3-14 of the default model. Each
measurement is paired with an unsteered run right before it and the table gives the median of the
paired ratios, so the drift of a shared machine does not decide the result. A second table
isolates the hook: single-token decodes with the hook switched on and off every other decode.
Target on CPU: tokens/s with the hook / unsteered >= 0.90.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import machine_line, paired_ratios, print_table, ratio_cells
from steer import tokens_per_second

from ggsteer import SteeredModel
from ggsteer.steering.program import compile_program
from ggsteer.vectors import ControlVector

LAYERS = list(range(3, 15))


def intervention_cases(vector: ControlVector) -> dict[str, dict]:
    return {
        "add (llama.cpp adapter)": dict(op="add"),
        "add, generated tokens only (hook)": dict(op="add", when="generated"),
        "ablate (hook)": dict(op="ablate"),
        "clamp (hook)": dict(op="clamp", strength=0.5),
        "add_normalized (hook)": dict(op="add_normalized"),
        "add if condition holds (hook)": dict(op="add", condition=(vector, -1.0, 2)),
    }


def hook_cost_per_decode(model: SteeredModel, vector: ControlVector, cases: dict[str, dict],
                         decodes: int) -> list[list[str]]:
    """What the hook adds to one single-token decode, toggled on and off every decode (no drift).

    Each decode is evaluated as a prompt row, so conditions are recomputed every time (more work
    than while generating).
    """
    rows = []
    prompt = model.tokenize_prompt("Once upon a time")
    for name, options in cases.items():
        options = dict(options)
        model.set_control(vector, options.pop("strength", 0.5), layers=LAYERS, **options)
        if not model.hook.intervening:
            continue  # the adapter path adds no hook
        program = compile_program([], model.controls, n_slots=model.n_seq_max)
        model.reset_control()
        times: dict[bool, list[float]] = {False: [], True: []}
        model.eval(prompt)
        for step in range(decodes):
            if model.n_tokens >= model.n_ctx() - 1:
                model.reset()
            hooked = step % 2 == 1
            program.install(model.hook) if hooked else model.hook.clear_program()
            start = time.perf_counter()
            model.eval(prompt[-1:])
            times[hooked].append(time.perf_counter() - start)
        model.hook.clear_program()
        off, on = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        rows.append([name, f"{off:.2f}", f"{on:.2f}", f"{on - off:+.3f}", f"{off / on:.3f}"])
    model.reset_control()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decodes", type=int, default=400, help="single-token decodes per case for the hook cost")
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args()
    model = SteeredModel(n_threads=os.cpu_count(), n_gpu_layers=args.gpu_layers)
    rng = np.random.default_rng(0)
    vector = ControlVector({il: rng.normal(size=model.n_embd).astype(np.float32) * 5 for il in range(1, model.n_layer)},
                           model.model_hint, {"unit": "gap"})
    cases = intervention_cases(vector)

    def measure(name: str | None) -> float:
        if name is None:
            model.reset_control()
        else:
            options = dict(cases[name])
            model.set_control(vector, options.pop("strength", 0.5), layers=LAYERS, **options)
        return tokens_per_second(model, args.tokens)

    tokens_per_second(model, 16)  # warm-up
    ratios, speeds = paired_ratios(measure, list(cases), args.rounds)
    model.reset_control()
    rows = [["unsteered", f"{statistics.median(speeds[None]):.1f}", "1.000", "-"]]
    rows += [[name, f"{statistics.median(speeds[name]):.1f}", *ratio_cells(ratios[name])] for name in cases]
    device = "GPU" if args.gpu_layers else "CPU"
    print_table(
        f"Generation with interventions ({device}), {args.tokens} tokens, greedy, "
        f"median of {args.rounds} paired rounds, "
        f"layers 3-14, {model.model_name} ({machine_line()})",
        ["run", "tokens/s (median)", "ratio to unsteered (median)", "ratio range"],
        rows,
    )
    print_table(
        f"Hook cost per single-token decode ({device}), toggled every decode, median of {args.decodes // 2} each",
        ["run", "ms unhooked", "ms hooked", "added ms", "ratio"],
        hook_cost_per_decode(model, vector, cases, args.decodes),
    )
    model.close()


if __name__ == "__main__":
    main()
