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

    python benchmarks/train.py --adaptive [--model PATH] [--presets happy,calm,honest] [--pool suffix]
                               [--gpu-layers N] [--threads N]

The old path (every pair of a preset, each prompt's last token) against `ggsteer train`'s rounds
that stop when the direction is stable (with `--pool`, default "suffix"): tokens decoded (which do
not depend on the machine's load; today's counted from the trie plan of `train_vector`'s one
capture, the rounds' by their captures), the seconds of the rounds and of a capture of every pair at
the recommended layers (which gives today's mean_diff direction there without running the output
head), the median and lowest |cos| at the recommended layers of the rounds' direction with every
pair's direction in the same pool and with today's direction, and the move each vector gives the
behaviour score on the preset's held-out prompts at equal fluency cost (KL 0.25 on the neutral
texts, so that pools whose strength units differ compare fairly): the ratio rounds / today with
its 10-90% spread over resampled prompts, and the mean paired difference in standard errors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import BareContext, machine_line, paired_times, print_table, ratio_cells

from ggsteer import CaptureStats, SteeredModel
from ggsteer.evaluate import DEFAULT_MAX_KL
from ggsteer.evaluate.fluency import neutral_tokens
from ggsteer.evaluate.tune import Setting, measure
from ggsteer.evaluate.tune_report import ratio_and_spread
from ggsteer.train import get_preset, load_eval_prompts, make_dataset, methods, preset_dataset, truncated_suffixes
from ggsteer.train.capture import capture_pooled, tokenize_prompts
from ggsteer.train.capture_plan import plan_shared
from ggsteer.train.extract import DEFAULT_POOL, TRAIN_POOLS, extra_pools, extra_prompts, pair_pools
from ggsteer.train.rounds import RoundsLog, train_in_rounds
from ggsteer.vectors import ControlVector, default_training_layers

# strengths the held-out comparison measures KL at (both pools' vectors reach KL 0.25 inside it)
KL_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5)

REPLIES = [
    "I walked to the market this morning and bought some bread for the week.",
    "The meeting ran long, so we moved the rest of the agenda to Friday afternoon.",
    "My brother called to say the train was late again because of the snow.",
    "We planted tomatoes along the fence, and the neighbours brought us some seeds.",
    "She finished the report, sent it to the team, and went out for a walk.",
]


def truncated_dataset():
    return make_dataset("Act as if you are an extremely {persona} person.", ["happy"], ["sad"],
                        truncated_suffixes(REPLIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suffixes", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adaptive", action="store_true", help="all pairs vs rounds that stop when stable")
    parser.add_argument("--model", default=None, help="GGUF model (default: the default model)")
    parser.add_argument("--presets", default="happy,calm,honest")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU (llama.cpp n_gpu_layers)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--save", default=None, help="with --adaptive: save each rounds vector as SAVE-PRESET.gguf")
    parser.add_argument("--pool", default=DEFAULT_POOL, choices=TRAIN_POOLS, help="with --adaptive: the rounds' pool")
    args = parser.parse_args()
    if args.adaptive:
        adaptive_table(args)
        return

    model = SteeredModel(n_threads=args.threads, n_seq_max=args.batch, n_gpu_layers=args.gpu_layers)
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
                lambda e=entries, m=method, ls=layers: ControlVector.train(model, e, method=m, layers=ls,
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


def adaptive_table(args) -> None:
    model = SteeredModel(args.model, n_threads=args.threads, n_gpu_layers=args.gpu_layers, n_ctx=2048)
    model.hidden_states(["warm up the weights"])
    rows = []
    for name in args.presets.split(","):
        preset = get_preset(name)
        entries = preset_dataset(name, chat_template=model.chat_instruction_formatter())
        period = len(preset.positive_personas)
        stats, log = CaptureStats(), RoundsLog()
        started = time.perf_counter()
        rounds = train_in_rounds(model, entries, pool=args.pool, period=period, stats=stats, log=log)
        seconds = time.perf_counter() - started
        if args.save:
            rounds.save(f"{args.save}-{name}.gguf", overwrite=True)
        layers = rounds.recommended_layers
        started = time.perf_counter()
        today = all_pairs_direction(model, entries, layers, "last")
        today_seconds = time.perf_counter() - started
        every = today if args.pool == "last" else all_pairs_direction(model, entries, layers, args.pool)
        tokens = today_tokens(model, entries)
        effect = effect_at_kl(model, name, [today, rounds], DEFAULT_MAX_KL)
        rows.append([name, f"{len(entries)} / {rounds.metadata['pairs_used']}",
                     f"{tokens} / {stats.tokens} ({stats.tokens / tokens:.3f})", f"{today_seconds:.0f} / {seconds:.0f}",
                     " ".join(f"{n}:{s:.4f}" for n, s in zip(log.pairs, log.stability)) + f" ({log.stopped})",
                     agreement(every, rounds), agreement(today, rounds), effect])
        print(rows[-1], flush=True)
    print_table(
        f"Training on {model.model_name}: every pair, last token (the old path) vs rounds, {args.pool} pool "
        f"({machine_line()}, load {os.getloadavg()[0]:.2f}, n_gpu_layers {args.gpu_layers})",
        ["preset", "pairs all / rounds", "tokens decoded today / rounds (ratio)",
         "s today's capture / rounds", "median stability by round (stop)",
         "\\|cos\\| with every pair, same pool: median (lowest)",
         "\\|cos\\| with today's direction: median (lowest)",
         f"move at KL {DEFAULT_MAX_KL:g}: today / rounds, ratio [10-90%] (diff / s.e.)"],
        rows,
    )
    model.close()


def today_tokens(model, entries) -> int:
    """Tokens `train_vector` decodes on every pair: the trie plan of its one capture (counted, not run)."""
    prompts = [text for entry in entries for text in (entry.positive, entry.negative)]
    extra = extra_prompts(prompts)
    token_lists = tokenize_prompts(model, prompts + extra[0] + extra[1])
    plan = plan_shared(token_lists, ["last"] * len(prompts) + extra_pools(extra), model.n_batch)
    return sum(len(segment.tokens) for segment in plan.segments)


def all_pairs_direction(model, entries, layers, pool: str) -> ControlVector:
    """The mean_diff direction of every pair at `layers` (what train_vector gives there with `pool`),
    captured without the other layers so that no output head runs."""
    prompts = [text for entry in entries for text in (entry.positive, entry.negative)]
    hidden = np.stack(capture_pooled(model, prompts, pair_pools(model, prompts, pool), layers=layers, progress=True))
    fits = [methods.fit_layer(hidden[0::2, k], hidden[1::2, k], "mean_diff") for k in range(len(layers))]
    directions = {il: fit.direction * abs(fit.gap) for il, fit in zip(layers, fits)}
    metadata = {"unit": "gap", "layers": list(layers), "gap": [abs(f.gap) for f in fits], "recommended_layers": layers}
    return ControlVector(directions, model.model_hint, metadata)


def agreement(a: ControlVector, b: ControlVector) -> str:
    """Median and lowest |cos| of the two directions over a's layers."""
    cos = [abs(float(np.dot(a.directions[il], b.directions[il])))
           / float(np.linalg.norm(a.directions[il]) * np.linalg.norm(b.directions[il])) for il in a.recommended_layers]
    return f"{np.median(cos):.4f} ({min(cos):.4f})"


def effect_at_kl(model, preset: str, vectors: list[ControlVector], target: float) -> str:
    """The behaviour move of each vector on the preset's held-out prompts at the strength where its KL
    on the neutral texts equals `target` (each prompt's move interpolated on log KL between the grid
    strengths around it): the two vectors' strength units differ, their fluency cost does not."""
    items, neutral = load_eval_prompts(preset), neutral_tokens(model, None)
    moves = [moves_at_kl(model, vector, items, neutral, target) for vector in vectors]
    if any(m is None for m in moves):
        return "grid does not reach the KL"
    ratio, (low, high) = ratio_and_spread(moves[0], moves[1], seed=0)
    diff = moves[1] - moves[0]
    noise = float(np.std(diff, ddof=1) / np.sqrt(len(diff)))
    return (f"{moves[0].mean():+.2f} / {moves[1].mean():+.2f}, {ratio:.3f} [{low:.3f}-{high:.3f}] "
            f"({diff.mean() / noise:+.1f})")


def moves_at_kl(model, vector, items, neutral, target: float) -> np.ndarray | None:
    layers = tuple(vector.recommended_layers)
    settings = [Setting("add", "all", layers, strength) for strength in KL_GRID]
    moves, kls = measure(model, vector, settings, items, neutral)
    above = int(np.searchsorted(kls, target))
    if not 0 < above < len(KL_GRID):
        return None
    w = (np.log(target) - np.log(kls[above - 1])) / (np.log(kls[above]) - np.log(kls[above - 1]))
    return moves[above - 1] + w * (moves[above] - moves[above - 1])


if __name__ == "__main__":
    main()
