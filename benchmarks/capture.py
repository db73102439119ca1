"""Capture overhead: ggsteer's hooked capture of every layer vs a bare batched llama_decode.

    python benchmarks/capture.py [--prompts 96] [--repeats 3]

Same model, tokens and batch packing (32 sequences per decode); the bare context has no eval
callback at all. Target: capture (every prompt decoded in full) / bare <= 1.10.
"""

from __future__ import annotations

import argparse
import os

from _common import BareContext, best_time, machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.dataset import preset_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="sequences per decode")
    args = parser.parse_args()

    model = SteeredModel(n_threads=os.cpu_count(), n_seq_max=args.batch)
    pairs = preset_dataset("happy", max_suffixes=(args.prompts + 5) // 6)
    prompts = [text for entry in pairs for text in (entry.positive, entry.negative)][: args.prompts]
    token_lists = [model.tokenize_prompt(p) for p in prompts]
    bare = BareContext(model)
    bare.decode_prompts(token_lists[:4], args.batch)  # warm-up: first decode repacks weights
    model.hidden_states(prompts[:4])

    t_bare = best_time(lambda: bare.decode_prompts(token_lists, args.batch), args.repeats)
    t_full = best_time(lambda: model.hidden_states(prompts, batch_size=args.batch, share_prefixes=False, progress=False), args.repeats)
    t_shared = best_time(lambda: model.hidden_states(prompts, batch_size=args.batch, progress=False), args.repeats)
    n = len(prompts)
    rows = [
        ["bare llama_decode, every prompt in full", f"{t_bare:.2f}", "1.00", f"{n / t_bare:.1f}"],
        ["capture all layers (last), every prompt in full", f"{t_full:.2f}", f"{t_full / t_bare:.3f}", f"{n / t_full:.1f}"],
        ["capture all layers (last), shared prefixes", f"{t_shared:.2f}", f"{t_shared / t_bare:.3f}", f"{n / t_shared:.1f}"],
    ]
    tokens = sum(map(len, token_lists))
    print_table(
        f"Capture on {model.model_name}: {n} prompts, {tokens} tokens, {args.batch} sequences/decode, best of {args.repeats} ({machine_line()})",
        ["run", "seconds", "ratio to bare", "prompts/s"],
        rows,
    )
    bare.close()
    model.close()


if __name__ == "__main__":
    main()
