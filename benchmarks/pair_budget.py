"""How many pairs a direction needs: agreement with the every-pair direction against tokens decoded.

    python benchmarks/pair_budget.py [--model PATH] [--presets happy,calm,honest] [--pool suffix] [--threads N]

For each preset, every pair's state (pooled as training pools it: `--pool`, default "suffix", the mean
over the tokens both prompts of a pair end with; "last" the last token) is captured once at the
recommended steering layers.
The mean_diff direction of the first n pairs of the training order (`balanced_order` in train/rounds.py,
the order `ggsteer train` takes them in) is then compared with the direction of every pair: the
median and the lowest |cos| over the recommended layers. "Tokens" is what one capture of those n
pairs decodes (their token trie, the extra prompts for the ablation direction included), as a share
of what training on every pair decodes; the default rounds decode a little more than one capture of
their pairs (each round decodes the persona prompts again). Nothing here is timed: the tokens and the
directions do not depend on the machine.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _common import machine_line, print_table
from train import today_tokens

from ggsteer import SteeredModel
from ggsteer.train import get_preset, preset_dataset
from ggsteer.train.capture import capture_pooled
from ggsteer.train.extract import DEFAULT_POOL, TRAIN_POOLS, pair_pools
from ggsteer.train.rounds import balanced_order
from ggsteer.vectors import default_steering_layers

PAIR_COUNTS = (48, 144, 288, 384, 768, 1152)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def preset_rows(model, name: str, pool: str) -> list[list[str]]:
    entries = preset_dataset(name, chat_template=model.chat_instruction_formatter())
    layers = default_steering_layers(model.n_layer)
    order = balanced_order(len(entries), len(get_preset(name).positive_personas))
    ordered = [entries[i] for i in order]
    prompts = [text for entry in ordered for text in (entry.positive, entry.negative)]
    hidden = np.stack(capture_pooled(model, prompts, pair_pools(model, prompts, pool), layers=layers,
                                     progress=True)).astype(np.float64)
    diffs = hidden[0::2] - hidden[1::2]  # [pairs, layers, n_embd], in training order
    everything = unit(diffs.mean(axis=0))
    today = today_tokens(model, entries)
    rows = []
    for n in [count for count in PAIR_COUNTS if count < len(entries)]:
        cos = np.abs((unit(diffs[:n].mean(axis=0)) * everything).sum(axis=-1))
        tokens = today_tokens(model, ordered[:n])  # one capture of these pairs, as train_vector's
        rows.append([name, pool, str(n), f"{n / len(entries):.3f}", f"{tokens} / {today} ({tokens / today:.3f})",
                     f"{np.median(cos):.4f}", f"{cos.min():.4f} (layer {layers[int(cos.argmin())]})"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF model (default: the default model)")
    parser.add_argument("--presets", default="happy,calm,honest")
    parser.add_argument("--pool", default=DEFAULT_POOL, choices=TRAIN_POOLS)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    model = SteeredModel(args.model, n_threads=args.threads)
    rows = [row for name in args.presets.split(",") for row in preset_rows(model, name, args.pool)]
    layers = default_steering_layers(model.n_layer)
    print_table(f"Pairs against agreement with every pair's direction on {model.model_name}, layers "
                f"{layers[0]}-{layers[-1]} ({machine_line()})",
                ["preset", "pool", "pairs", "share of pairs", "tokens of one capture / every pair (ratio)",
                 "median |cos|", "lowest |cos|"], rows)
    model.close()


if __name__ == "__main__":
    main()
