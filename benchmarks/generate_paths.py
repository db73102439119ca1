"""One steered completion through ggsteer's batch engine vs through the Llama API it replaced in the CLI.

    python benchmarks/generate_paths.py [--tokens 64] [--rounds 7] [--threads N]

Baseline: `create_completion` with the vector set on the model (llama.cpp's control-vector adapter,
llama-cpp-python's sampler), greedy. Cases: `generate_batch` with the vector as the sequence's own
controls (the hook's per-slot program, llama.cpp's sampler chain), greedy and with the default
sampling settings (top-k, top-p, min-p, temperature, dist). Speeds count the tokens each run really
generated, so an early end of generation cannot flatter a path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import machine_line, paired_ratios, print_table, ratio_cells

from ggsteer import SteeredModel
from ggsteer.generation import generate_batch
from ggsteer.vectors import ControlVector

PROMPT = "Once upon a time, in a small village by the sea,"
STRENGTH = 0.5
LAYERS = range(3, 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    model = SteeredModel(n_threads=args.threads, n_threads_batch=args.threads)
    rng = np.random.default_rng(0)
    vector = ControlVector({il: rng.normal(size=model.n_embd).astype(np.float32) * 5 for il in range(1, model.n_layer)},
                           model.model_hint, {"unit": "gap"})
    controls = [model.intervention(vector, STRENGTH, layers=LAYERS)]

    def measure(case: str | None) -> float:
        start = time.perf_counter()
        if case is None:
            model.set_interventions(controls)
            result = model.create_completion(PROMPT, max_tokens=args.tokens, temperature=0.0)
            n = result["usage"]["completion_tokens"]
            model.reset_control()
        else:
            sampled = {"temperature": 0.8, "seed": 1} if case == "engine, sampled" else {}
            (result,) = generate_batch(model, [PROMPT], [controls], args.tokens, details=True, **sampled)
            n = result.completion_tokens
        return n / (time.perf_counter() - start)

    measure(None)  # warm-up
    cases = ["engine, greedy", "engine, sampled"]
    ratios, speeds = paired_ratios(measure, cases, args.rounds)
    rows = [["Llama API (create_completion, cvec adapter), greedy", f"{statistics.median(speeds[None]):.1f}",
             "1.000", "-"]]
    rows += [[f"{case} (generate_batch, per-slot hook)", f"{statistics.median(speeds[case]):.1f}",
              *ratio_cells(ratios[case])] for case in cases]
    print_table(f"One steered completion of up to {args.tokens} tokens, median of {args.rounds} paired rounds on "
                f"{model.model_name}, {args.threads} threads ({machine_line()})",
                ["path", "tokens/s (median)", "ratio (median)", "ratio range"], rows)
    model.close()


if __name__ == "__main__":
    main()
