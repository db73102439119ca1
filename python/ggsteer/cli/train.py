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
from ggsteer.train.methods import METHODS
from ggsteer.vectors import ControlVector


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train a control vector from contrastive pairs")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in behaviour (see `ggsteer presets`)")
    source.add_argument("--pairs", help='JSONL file of {"positive": ..., "negative": ...} pairs')
    add_model_arguments(train)
    train.add_argument("--method", default="mean_diff", choices=METHODS,
                       help="mean_diff (default), pca_diff, pca_center or probe")
    train.add_argument("--layers", default=None, help="layers to train, e.g. 1-17 (default: all steerable layers)")
    train.add_argument("--pool", default="last", choices=("last", "mean"),
                       help="read each prompt's last token (default) or the mean over its tokens "
                            "(llama.cpp's cvector-generator averages tokens)")
    train.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs")
    train.add_argument("-o", "--output", required=True, help="output GGUF file")
    train.add_argument("--force", action="store_true", help="overwrite an existing output file")
    train.set_defaults(func=cmd_train)

    presets = sub.add_parser("presets", help="list the built-in behaviours")
    presets.set_defaults(func=cmd_presets)


def cmd_presets(args) -> int:
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
    layers = layers_argument(args.layers)
    pairs = None if args.preset else load_jsonl(args.pairs)
    if args.preset:
        get_preset(args.preset)  # a typo fails before the model loads
    model = load_model(args)
    if pairs is None:
        pairs = preset_dataset(args.preset, chat_template=model.chat_instruction_formatter())
    if args.max_pairs is not None:
        pairs = pairs[: args.max_pairs]
    print(f"training {args.method} on {len(pairs)} pairs with {model.model_name}", file=sys.stderr)
    vector = ControlVector.train(model, pairs, method=args.method, layers=layers, pool=args.pool, progress=True)
    vector.save(output, overwrite=args.force)
    print(f"wrote {output} ({len(vector.layers)} layers, n_embd {vector.n_embd})")
    print(llama_cpp_usage_line(model.model_path, output, vector))
    return 0
