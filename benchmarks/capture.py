"""Capture overhead: ggsteer's hooked capture vs a bare batched llama_decode of the same tokens.

    python benchmarks/capture.py [--prompts 96] [--rounds 7] [--batch 32]

Same model, tokens and batch packing; the bare context has no eval callback at all. Two datasets:
the happy preset (template + suffix pairs) and benchmarks/train.py's repeng-style truncated replies.
Each capture run is paired with its own bare run right before it, the order of the pairs rotating
each round; the table gives the median of the paired time ratios and their range.

- Shared prefixes: the bare side decodes the capture plan's distinct tokens in the same batches and
  KV copies, with one output row per sequence per decode. Target: capture of every layer but the
  last, pool="last", <= 1.05x. Capturing the last layer too makes each captured row a logits output
  (the output head: ~0.34 GFLOP a row on Gemma 3 270M); that row shows what it costs.
- Every prompt in full: the bare side decodes every prompt, one output row per prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import BareContext, machine_line, paired_times, print_table, ratio_cells
from train import truncated_dataset

from ggsteer import CaptureStats, SteeredModel
from ggsteer.train import preset_dataset
from ggsteer.train.capture_plan import plan_shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96, help="prompts from the happy preset")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="sequences per decode")
    parser.add_argument("--no-full", action="store_true", help="leave out the every-prompt-in-full pair (slow)")
    args = parser.parse_args()

    model = SteeredModel(n_threads=os.cpu_count(), n_seq_max=args.batch)
    preset = preset_dataset("happy", max_suffixes=(args.prompts + 5) // 6)
    datasets = {
        "happy preset": [text for entry in preset for text in (entry.positive, entry.negative)][: args.prompts],
        "truncated replies": [text for entry in truncated_dataset() for text in (entry.positive, entry.negative)],
    }
    bare = BareContext(model)
    last = model.n_layer - 1
    but_last = list(range(last))
    model.hidden_states(["warm up the weights"])
    bare.decode_prompts([model.tokenize_prompt("warm up the weights")], 1)

    pairs, stats, sizes = {}, {}, {}
    for name, prompts in datasets.items():
        token_lists = [model.tokenize_prompt(p) for p in prompts]
        plan_tokens = sum(len(s.tokens) for s in plan_shared(token_lists, "last", model.n_batch).segments)
        sizes[name] = (len(prompts), sum(map(len, token_lists)), plan_tokens)

        def bare_trie(token_lists=token_lists):
            bare.decode_plan(plan_shared(token_lists, "last", model.n_batch), args.batch)

        def bare_full(token_lists=token_lists):
            bare.decode_prompts(token_lists, args.batch)

        def capture(prompts=prompts, layers=None, share=True, case=None):
            stats[case] = CaptureStats()
            model.hidden_states(prompts, layers=layers, batch_size=args.batch, share_prefixes=share, progress=False,
                                stats=stats[case])

        cases = {
            (name, f"layers 0-{last - 1}, shared prefixes", "bare, distinct tokens"): (bare_trie, but_last, True),
            (name, f"layers 0-{last}, shared prefixes", "bare, distinct tokens"): (bare_trie, None, True),
            (name, f"layers 0-{last}, every prompt in full", "bare, every prompt in full"): (bare_full, None, False),
        }
        if args.no_full:
            cases = {case: value for case, value in cases.items() if value[0] is not bare_full}
        for case, (baseline, layers, share) in cases.items():
            pairs[case] = (baseline, lambda p=prompts, ls=layers, s=share, c=case: capture(p, ls, s, c))

    results = paired_times(pairs, args.rounds)
    rows = []
    for case, (ratios, base_times, case_times) in results.items():
        n_prompts, full_tokens, distinct = sizes[case[0]]
        st = stats[case]
        rows.append([case[0], f"{n_prompts} / {full_tokens} / {distinct}", case[1], case[2],
                     f"{statistics.median(base_times):.3f}", f"{statistics.median(case_times):.3f}",
                     *ratio_cells(ratios),
                     f"{st.decodes} / {st.tokens_per_decode:.0f} / {st.output_rows}"])
    print_table(
        f'Capture (pool="last") on {model.model_name}, {args.batch} sequences/decode, '
        f"median of {args.rounds} paired rounds "
        f"({machine_line()}, load {os.getloadavg()[0]:.2f})",
        ["dataset", "prompts / tokens in full / distinct", "capture", "baseline", "baseline s", "capture s",
         "time ratio (median)", "range", "decodes / tokens per decode / output rows"],
        rows,
    )
    bare.close()
    model.close()


if __name__ == "__main__":
    main()
