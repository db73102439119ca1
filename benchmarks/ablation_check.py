"""Issue 16's check through the library itself: train, then the ablation view of ablate and clamp.

    python benchmarks/ablation_check.py --preset happy [--max-suffixes 64] [--neutral 4] [--out view.json]

Rows: "before" (every row, raw direction: what ablate did before issue 16), ablate, ablate on every row
(skip_first=0: what a weight bake does), clamp +1, clamp -1 (ggsteer.vectors.projection's method: the sink left
alone, the direction without the shared directions and the sink's state). Recovery is measured on
prompts asking for the behaviour (+) and for its opposite (-).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import load_models_without_extra_buffers

from ggsteer import SteeredModel
from ggsteer.evaluate import load_neutral_texts
from ggsteer.evaluate.ablation import ablation_view, asking_items
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector

SAMPLE_PROMPT = "I woke up this morning and"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="happy")
    parser.add_argument("--max-suffixes", type=int, default=None)
    parser.add_argument("--neutral", type=int, default=None, help="only the first N neutral texts")
    parser.add_argument("--no-amx-workaround", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not args.no_amx_workaround:
        load_models_without_extra_buffers()
    model = SteeredModel(n_ctx=8192, n_threads=2, n_threads_batch=2)
    start = time.time()
    vector = ControlVector.train(model, preset_dataset(args.preset, max_suffixes=args.max_suffixes), progress=False)
    print(f"trained in {time.time() - start:.0f}s", flush=True)
    before = ControlVector(vector.directions, vector.model_hint,
                           {k: v for k, v in vector.metadata.items() if not k.startswith("ablation_")})
    items = load_eval_prompts(args.preset)
    asking = asking_items(args.preset, items)
    opposite = asking_items(args.preset, items, side="negative")
    texts = load_neutral_texts()[: args.neutral]
    rows = []
    for label, vec, op, strength, skip in [("before", before, "ablate", 0.0, 0),
                                           ("ablate", vector, "ablate", 0.0, None),
                                           ("ablate every row", vector, "ablate", 0.0, 0),
                                           ("clamp +1", vector, "clamp", 1.0, None),
                                           ("clamp -1", vector, "clamp", -1.0, None)]:
        view = ablation_view(model, vec, items, asking, opposite=opposite, op=op, strength=strength,
                             neutral_texts=texts, sample_prompt=SAMPLE_PROMPT, skip_first=skip)
        row = {"preset": args.preset, "setting": label, **view.to_dict()}
        rows.append(row)
        shrink, raw = list(view.spread_shrink.values()), list(view.raw_spread_shrink.values())
        print(f"{args.preset} {label}: KL {view.kl:.3f} ppl x{view.perplexity_ratio:.2f} "
              f"behaviour neutral {view.neutral_behaviour:.2f} "
              f"asking {view.asking_behaviour:.2f} -> {view.ablated_behaviour:.2f} recovery {_share(view.recovery)} "
              f"opposite {view.opposite_behaviour:.2f} -> {view.opposite_ablated:.2f} "
              f"recovery {_share(view.opposite_recovery)} "
              f"gap left {_share(view.gap_left)} "
              f"shrink min {min(shrink):.3g} raw min {min(raw):.3g} | {view.sample!r}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _share(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
