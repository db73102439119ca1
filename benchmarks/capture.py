"""Capture overhead: ggsteer's hooked capture of every layer vs a bare batched llama_decode.

    python benchmarks/capture.py [--prompts 96] [--rounds 7]

Same model, tokens and batch packing (32 sequences per decode); the bare context has no eval
callback at all. Each capture run is paired with a bare run right before it and the table gives
the median of the paired time ratios, so the drift of a shared machine does not decide the result.
Target: capture (every prompt decoded in full) / bare <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import BareContext, machine_line, paired_ratios, print_table, ratio_cells

from ggsteer import SteeredModel
from ggsteer.train import preset_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="sequences per decode")
    args = parser.parse_args()

    model = SteeredModel(n_threads=os.cpu_count(), n_seq_max=args.batch)
    pairs = preset_dataset("happy", max_suffixes=(args.prompts + 5) // 6)
    prompts = [text for entry in pairs for text in (entry.positive, entry.negative)][: args.prompts]
    token_lists = [model.tokenize_prompt(p) for p in prompts]
    bare = BareContext(model)
    bare.decode_prompts(token_lists[:4], args.batch)  # warm-up: first decode repacks weights
    model.hidden_states(prompts[:4])

    runs = {
        None: lambda: bare.decode_prompts(token_lists, args.batch),
        "capture all layers (last), every prompt in full":
            lambda: model.hidden_states(prompts, batch_size=args.batch, share_prefixes=False, progress=False),
        "capture all layers (last), shared prefixes": lambda: model.hidden_states(prompts, batch_size=args.batch, progress=False),
    }
    n = len(prompts)

    def prompts_per_second(case) -> float:
        start = time.perf_counter()
        runs[case]()
        return n / (time.perf_counter() - start)

    ratios, speeds = paired_ratios(prompts_per_second, [case for case in runs if case is not None], args.rounds)
    rows = [["bare llama_decode, every prompt in full", f"{n / statistics.median(speeds[None]):.2f}", "1.000", "-",
             f"{statistics.median(speeds[None]):.1f}"]]
    for case, speed_ratios in ratios.items():
        # paired_ratios gives speed ratios; the target is on time, its inverse
        rows.append([case, f"{n / statistics.median(speeds[case]):.2f}", *ratio_cells([1 / r for r in speed_ratios]),
                     f"{statistics.median(speeds[case]):.1f}"])
    tokens = sum(map(len, token_lists))
    print_table(
        f"Capture on {model.model_name}: {n} prompts, {tokens} tokens, {args.batch} sequences/decode, "
        f"median of {args.rounds} paired rounds ({machine_line()})",
        ["run", "seconds (median)", "time ratio to bare (median)", "ratio range", "prompts/s (median)"],
        rows,
    )
    bare.close()
    model.close()


if __name__ == "__main__":
    main()
