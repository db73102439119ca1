"""End-to-end training time vs a bare batched decode of every prompt in full, paired in one run.

    python benchmarks/train.py [--suffixes 24] [--rounds 5] [--batch 32]

Two datasets: a preset (3 persona pairs x N suffixes, template + suffix) and a repeng-style one
(2 personas x 5 replies, each truncated after every word). Each training run is paired with a bare
decode of every prompt in full (no callback, one output row per prompt) right before it, the order
of the pairs rotating each round; the table gives the median of the paired time ratios and their
range. Rows: pca_center and mean_diff on the default layers, and mean_diff with the last layer added
(its rows must be logits outputs, which runs the output head). The last column is what one training
run's capture costs: llama_decode calls, tokens per decode, logits rows requested.
repeng on the same data: benchmarks/repeng_compare.py (its own environment).
"""

from __future__ import annotations

import argparse
import os
import statistics

from _common import BareContext, machine_line, paired_times, print_table, ratio_cells

from ggsteer import CaptureStats, SteeredModel
from ggsteer.train import make_dataset, preset_dataset, truncated_suffixes
from ggsteer.vectors import ControlVector, default_training_layers

REPLIES = [
    "I walked to the market this morning and bought some bread for the week.",
    "The meeting ran long, so we moved the rest of the agenda to Friday afternoon.",
    "My brother called to say the train was late again because of the snow.",
    "We planted tomatoes along the fence, and the neighbours brought us some seeds.",
    "She finished the report, sent it to the team, and went out for a walk.",
]


def truncated_dataset():
    return make_dataset("Act as if you are an extremely {persona} person.", ["happy"], ["sad"], truncated_suffixes(REPLIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suffixes", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    model = SteeredModel(n_threads=os.cpu_count(), n_seq_max=args.batch)
    bare = BareContext(model)
    datasets = {
        f"preset happy, {args.suffixes} suffixes": preset_dataset("happy", max_suffixes=args.suffixes),
        "repeng-style truncated replies": truncated_dataset(),
    }
    default_layers = default_training_layers(model.n_layer)
    with_last = sorted(set(default_layers) | {model.n_layer - 1})
    variants = {
        f"pca_center, layers {default_layers[0]}-{default_layers[-1]}": ("pca_center", default_layers),
        f"mean_diff, layers {default_layers[0]}-{default_layers[-1]}": ("mean_diff", default_layers),
        f"mean_diff, layers {with_last[0]}-{with_last[-1]} (with the last)": ("mean_diff", with_last),
    }
    model.hidden_states(["warm up the weights"])
    bare.decode_prompts([model.tokenize_prompt("warm up the weights")], 1)

    pairs, facts = {}, {}
    for name, entries in datasets.items():
        prompts = [text for entry in entries for text in (entry.positive, entry.negative)]
        token_lists = [model.tokenize_prompt(p) for p in prompts]
        for variant, (method, layers) in variants.items():
            stats = CaptureStats()  # the pairs' capture; train's walk adds the shared and ablation prompts' tokens
            model.hidden_states(prompts, layers=layers, batch_size=args.batch, progress=False, stats=stats)
            facts[(name, variant)] = (len(prompts), stats)
            pairs[(name, variant)] = (
                lambda t=token_lists: bare.decode_prompts(t, args.batch),
                lambda e=entries, m=method, l=layers: ControlVector.train(model, e, method=m, layers=l,
                                                                          batch_size=args.batch, progress=False),
            )
    results = paired_times(pairs, args.rounds)
    rows = []
    for (name, variant), (ratios, base_times, case_times) in results.items():
        n_prompts, stats = facts[(name, variant)]
        speedups = [1 / r for r in ratios]
        rows.append([name, f"{n_prompts} / {stats.prompt_tokens} / {stats.tokens}", variant,
                     f"{statistics.median(base_times):.3f}", f"{statistics.median(case_times):.3f}",
                     *ratio_cells(speedups), f"{stats.decodes} / {stats.tokens_per_decode:.0f} / {stats.output_rows}"])
    print_table(
        f"Training on {model.model_name}, {args.batch} sequences/decode, median of {args.rounds} paired rounds "
        f"({machine_line()}, load {os.getloadavg()[0]:.2f})",
        ["dataset", "prompts / tokens in full / decoded", "ggsteer train", "bare decode s", "train s",
         "speed-up vs bare (median)", "range", "decodes / tokens per decode / output rows"],
        rows,
    )
    bare.close()
    model.close()


if __name__ == "__main__":
    main()
