"""End-to-end training time vs a bare batched decode of every prompt in full (and repeng, if installed).

    python benchmarks/train.py [--suffixes 24] [--repeats 2]

Two datasets: a preset (3 persona pairs x N suffixes, template + suffix) and a repeng-style
one (2 personas x 5 replies, each truncated after every word). Targets: ggsteer below the bare
decode on both; >= 4x faster than repeng on template+suffix pairs, >= 10x on truncated replies.
"""

from __future__ import annotations

import argparse
import os

from _common import BareContext, best_time, machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.train import make_dataset, preset_dataset, truncated_suffixes
from ggsteer.vectors import ControlVector

REPLIES = [
    "I walked to the market this morning and bought some bread for the week.",
    "The meeting ran long, so we moved the rest of the agenda to Friday afternoon.",
    "My brother called to say the train was late again because of the snow.",
    "We planted tomatoes along the fence, and the neighbours brought us some seeds.",
    "She finished the report, sent it to the team, and went out for a walk.",
]


def truncated_dataset():
    return make_dataset("Act as if you are an extremely {persona} person.", ["happy"], ["sad"], truncated_suffixes(REPLIES))


def repeng_seconds(pairs) -> str:
    try:
        import repeng  # noqa: F401
    except ImportError:
        return "not installed"
    return "see benchmarks/repeng_compare.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suffixes", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    model = SteeredModel(n_threads=os.cpu_count(), n_seq_max=args.batch)
    bare = BareContext(model)
    datasets = {
        f"preset happy, {args.suffixes} suffixes": preset_dataset("happy", max_suffixes=args.suffixes),
        "repeng-style truncated replies": truncated_dataset(),
    }
    model.hidden_states(["warm up the weights"])
    rows = []
    for name, pairs in datasets.items():
        prompts = [text for entry in pairs for text in (entry.positive, entry.negative)]
        token_lists = [model.tokenize_prompt(p) for p in prompts]
        t_bare = best_time(lambda: bare.decode_prompts(token_lists, args.batch), args.repeats)
        t_train = best_time(lambda: ControlVector.train(model, pairs, method="mean_diff", progress=False), args.repeats)
        rows.append([name, str(len(prompts)), str(sum(map(len, token_lists))), f"{t_bare:.2f}", f"{t_train:.2f}",
                     f"{t_bare / t_train:.2f}x", repeng_seconds(pairs)])
    print_table(
        f"Training (mean_diff, all layers) on {model.model_name}, best of {args.repeats} ({machine_line()})",
        ["dataset", "prompts", "tokens in full", "bare decode s", "ggsteer train s", "speed-up vs bare", "repeng"],
        rows,
    )
    bare.close()
    model.close()


if __name__ == "__main__":
    main()
