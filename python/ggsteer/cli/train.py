"""`ggsteer train` and `ggsteer presets`: contrastive pairs in, a control-vector file out."""

from __future__ import annotations

import sys

from ggsteer.cli.common import (
    CliError,
    add_model_arguments,
    layers_argument,
    llama_cpp_usage_line,
    load_model,
    output_path,
)
from ggsteer.train import get_preset, list_presets, load_jsonl, preset_dataset
from ggsteer.train.extract import DEFAULT_POOL, TRAIN_POOLS
from ggsteer.train.methods import METHODS
from ggsteer.train.rounds import (
    DEFAULT_MAX_PAIRS,
    DEFAULT_MIN_PAIRS,
    DEFAULT_TARGET,
    RoundsLog,
    RoundsPolicy,
    train_in_rounds,
)
from ggsteer.vectors import ControlVector
from ggsteer.vectors.file.describe import steerability_warning


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a control vector from contrastive pairs")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in behaviour (see `ggsteer presets`)")
    source.add_argument("--pairs", help='JSONL file of {"positive": ..., "negative": ...} pairs')
    add_model_arguments(train)
    train.add_argument("--method", default="mean_diff", choices=METHODS,
                       help="mean_diff (default), pca_diff, pca_center or probe")
    train.add_argument("--layers", default=None, help="layers to train, e.g. 1-17 (default: all steerable layers)")
    train.add_argument("--pool", default=DEFAULT_POOL, choices=TRAIN_POOLS,
                       help="suffix (default): the mean over the suffix both prompts of a pair continue with "
                            "(stable from fewer pairs than the last token, docs/efficient-training.md); last: each "
                            "prompt's last token, as repeng; mean: every token of each prompt, as cvector-generator")
    train.add_argument("--max-pairs", type=int, default=None,
                       help=f"use at most this many pairs (default: rounds stop by {DEFAULT_MAX_PAIRS}; "
                            "with --all-pairs: every pair)")
    train.add_argument("--min-pairs", type=int, default=DEFAULT_MIN_PAIRS,
                       help=f"pairs of the first round (default {DEFAULT_MIN_PAIRS})")
    train.add_argument("--stability", type=float, default=DEFAULT_TARGET,
                       help="stop adding pairs once the direction's median split-half stability at the steering "
                            f"layers reaches this (default {DEFAULT_TARGET:g})")
    train.add_argument("--all-pairs", action="store_true",
                       help="train on every pair at once instead of in rounds that stop when the direction is stable")
    train.add_argument("-o", "--output", required=True, help="output GGUF file")
    train.add_argument("--force", action="store_true", help="overwrite an existing output file")
    train.set_defaults(func=cmd_train)

    presets = sub.add_parser("presets", help="list the built-in behaviours")
    presets.set_defaults(func=cmd_presets)


def cmd_presets(_args) -> int:
    for preset in list_presets():
        pos = "/".join(preset.positive_personas)
        neg = "/".join(preset.negative_personas)
        print(f"{preset.name:<12} {preset.description}  [{pos} vs {neg}]")
    return 0


def cmd_train(args) -> int:
    # every check that can fail runs before the model loads and the training starts
    output = output_path(args.output, args.force)
    if args.max_pairs is not None and args.max_pairs < 1:
        raise CliError(f"--max-pairs must be at least 1, got {args.max_pairs}")
    policy = None if args.all_pairs else rounds_policy(args)
    layers = layers_argument(args.layers)
    pairs = None if args.preset else load_jsonl(args.pairs)
    if args.preset:
        get_preset(args.preset)  # a typo fails before the model loads
    model = load_model(args)
    if pairs is None:
        pairs = preset_dataset(args.preset, chat_template=model.chat_instruction_formatter())
    if policy is None:
        if args.max_pairs is not None:
            pairs = pairs[: args.max_pairs]
        print(f"training {args.method} on {len(pairs)} pairs with {model.model_name}", file=sys.stderr)
        vector = ControlVector.train(model, pairs, method=args.method, layers=layers, pool=args.pool, progress=True)
    else:
        vector = _train_in_rounds(args, model, pairs, layers, policy)
    vector.save(output, overwrite=args.force)
    print(f"wrote {output} ({len(vector.layers)} layers, n_embd {vector.n_embd})")
    warning = steerability_warning(vector.metadata)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(llama_cpp_usage_line(model.model_path, output, vector))
    return 0


def rounds_policy(args) -> RoundsPolicy:
    if args.min_pairs < 1:
        raise CliError(f"--min-pairs must be at least 1, got {args.min_pairs}")
    if not 0.0 < args.stability <= 1.0:
        raise CliError(f"--stability must be in (0, 1], got {args.stability}")
    cap = DEFAULT_MAX_PAIRS if args.max_pairs is None else args.max_pairs
    return RoundsPolicy(min_pairs=min(args.min_pairs, cap), max_pairs=cap, target=args.stability)


def _train_in_rounds(args, model, pairs, layers, policy: RoundsPolicy) -> ControlVector:
    # a preset's pairs come in blocks of its persona pairs (one block per suffix): keep blocks whole
    period = len(get_preset(args.preset).positive_personas) if args.preset else 1
    print(f"training {args.method} in rounds on up to {min(policy.max_pairs, len(pairs))} of {len(pairs)} pairs "
          f"with {model.model_name}", file=sys.stderr)
    log = RoundsLog()
    vector = train_in_rounds(model, pairs, method=args.method, layers=layers, pool=args.pool, policy=policy,
                             period=period, progress=True, log=log)
    steps = ", ".join(f"{n} pairs: {s:.4f}" for n, s in zip(log.pairs, log.stability))
    print(f"stability at the steering layers by round ({steps}); stopped: {log.stopped}", file=sys.stderr)
    return vector
