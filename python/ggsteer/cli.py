"""The `ggsteer` command line: demo, train, inspect, presets, generate, chat, export."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user error worth one clear line, not a traceback."""


# -- shared helpers -------------------------------------------------------------------------


def parse_vector_spec(spec: str) -> tuple[Path, float | None]:
    """`FILE` or `FILE:STRENGTH` (a path that exists as given is never split)."""
    if os.path.exists(spec) or ":" not in spec:
        return Path(spec), None
    path, _, text = spec.rpartition(":")
    try:
        strength = float(text)
    except ValueError:
        raise CliError(f"bad --vector {spec!r}: expected FILE or FILE:STRENGTH with a number after the colon") from None
    if not math.isfinite(strength):
        raise CliError(f"bad --vector {spec!r}: the strength must be a finite number")
    if not path:
        raise CliError(f"bad --vector {spec!r}: the file name is missing")
    return Path(path), strength


def load_model(args, **kwargs):
    from ggsteer import SteeredModel

    threads = getattr(args, "threads", None) or os.cpu_count()
    return SteeredModel(args.model, n_threads=threads, n_gpu_layers=getattr(args, "gpu_layers", 0), **kwargs)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to the GPU (llama.cpp's -ngl)")


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vector", "-v", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="control vector and strength (default: its recommended strength, else 1.0); repeatable")
    parser.add_argument("--layers", default=None, help="layers to steer, e.g. 3-14 (default: the vector's recommended layers)")
    parser.add_argument("--raw", action="store_true", help="strength is a plain coefficient (files without a trained gap)")
    parser.add_argument("--ablate", action="append", default=[], metavar="FILE",
                        help="project this vector's direction out of the residual stream; repeatable")
    parser.add_argument("--clamp", action="append", default=[], metavar="FILE:VALUE",
                        help="hold the projection on this vector at VALUE (in strength units; 0 = ablate); repeatable")
    parser.add_argument("--when", choices=("all", "prompt", "generated"), default="all",
                        help="steer every token (default), only the prompt, or only generated tokens")


def add_sampling_arguments(parser: argparse.ArgumentParser, n_default: int) -> None:
    parser.add_argument("-n", "--max-tokens", type=int, default=n_default)
    parser.add_argument("--temp", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat-penalty", type=float, default=1.15)


def load_vectors(specs: list[str]):
    """[(name, ControlVector, strength)] from --vector arguments."""
    from ggsteer.vector import ControlVector

    loaded = []
    for spec in specs:
        path, strength = parse_vector_spec(spec)
        vector = ControlVector.load(path)
        if strength is None:
            strength = vector.recommended_strength or 1.0
        loaded.append((path.stem, vector, strength))
    return loaded


def steering_interventions(model, args, vectors) -> list:
    """Interventions from --vector/--ablate/--clamp/--when/--layers/--raw."""
    from ggsteer.vector import ControlVector

    layers = layers_argument(args.layers)
    common = dict(layers=layers, raw=args.raw, when=args.when)
    items = [model.intervention(vector, strength, **common) for _, vector, strength in vectors]
    for path in args.ablate:
        items.append(model.intervention(ControlVector.load(path), 1.0, op="ablate", **common))
    for spec in args.clamp:
        path, value = parse_vector_spec(spec)
        if value is None:
            raise CliError(f"bad --clamp {spec!r}: expected FILE:VALUE")
        items.append(model.intervention(ControlVector.load(path), value, op="clamp", **common))
    return items


def layers_argument(text: str | None):
    from ggsteer.steer import parse_layer_range

    return None if text is None else parse_layer_range(text)


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed, repeat_penalty=args.repeat_penalty)


# -- commands -------------------------------------------------------------------------------


def cmd_presets(args) -> int:
    from ggsteer.dataset import list_presets

    for preset in list_presets():
        pos = "/".join(preset.positive_personas)
        neg = "/".join(preset.negative_personas)
        print(f"{preset.name:<12} {preset.description}  [{pos} vs {neg}]")
    return 0


def cmd_train(args) -> int:
    from ggsteer.dataset import load_jsonl, preset_dataset
    from ggsteer.vector import ControlVector

    output = Path(args.output)
    if output.exists() and not args.force:
        raise CliError(f"{output} already exists: pass --force to overwrite it")
    model = load_model(args)
    if args.preset:
        pairs = preset_dataset(args.preset, chat_template=model.chat_instruction_formatter())
    else:
        pairs = load_jsonl(args.pairs)
    if args.max_pairs is not None:
        if args.max_pairs < 1:
            raise CliError(f"--max-pairs must be at least 1, got {args.max_pairs}")
        pairs = pairs[: args.max_pairs]
    print(f"training {args.method} on {len(pairs)} pairs with {model.model_name}", file=sys.stderr)
    vector = ControlVector.train(model, pairs, method=args.method, layers=layers_argument(args.layers), progress=True)
    vector.save(output, overwrite=args.force)
    print(f"wrote {output} ({len(vector.layers)} layers, n_embd {vector.n_embd})")
    print(llama_cpp_usage_line(model.model_path, output, vector))
    return 0


def llama_cpp_usage_line(model_path, vector_path, vector, strength: float = 0.5) -> str:
    layers = vector.recommended_layers or vector.layers
    return (
        f"use it with llama.cpp: llama-cli -m {model_path} --control-vector-scaled {vector_path} {strength:g} "
        f"--control-vector-layer-range {min(layers)} {max(layers)}"
    )


def cmd_inspect(args) -> int:
    from ggsteer.vector_file import describe_vector_file, read_vector_file

    vf = read_vector_file(args.file, layer_offset=args.layer_offset)
    print(f"file:        {args.file}")
    print(describe_vector_file(vf))
    return 0


def cmd_generate(args) -> int:
    from ggsteer.generate import generate_command

    return generate_command(args)


def cmd_chat(args) -> int:
    from ggsteer.chat import chat_command

    return chat_command(args)


def cmd_demo(args) -> int:
    from ggsteer.demo import demo_command

    return demo_command(args)


def cmd_export(args) -> int:
    from ggsteer.export import export_command

    return export_command(args)


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ggsteer import __version__

    parser = argparse.ArgumentParser(
        prog="ggsteer",
        description="Control vectors for llama.cpp models: train them, save them as GGUF, steer generation.",
    )
    parser.add_argument("--version", action="version", version=f"ggsteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a happy/sad vector on the default model and show what it does")
    add_model_arguments(demo)
    demo.add_argument("--strength", type=float, default=None, help="steering strength (default: measured default)")
    demo.add_argument("-o", "--output", default=None, help="where to write the vector (default: ./ggsteer-happy.gguf)")
    demo.add_argument("-n", "--max-tokens", type=int, default=40)
    demo.add_argument("--retrain", action="store_true", help="ignore the cached vector")
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="train a control vector from contrastive pairs")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a built-in behaviour (see `ggsteer presets`)")
    source.add_argument("--pairs", help='JSONL file of {"positive": ..., "negative": ...} pairs')
    add_model_arguments(train)
    train.add_argument("--method", default="mean_diff", help="mean_diff (default), pca_diff, pca_center or probe")
    train.add_argument("--layers", default=None, help="layers to train, e.g. 1-17 (default: all steerable layers)")
    train.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs")
    train.add_argument("-o", "--output", required=True, help="output GGUF file")
    train.add_argument("--force", action="store_true", help="overwrite an existing output file")
    train.set_defaults(func=cmd_train)

    inspect = sub.add_parser("inspect", help="print a vector file's metadata, layers, norms and separation")
    inspect.add_argument("file")
    inspect.add_argument("--layer-offset", type=int, default=0, help="-1 for files from llama.cpp's cvector-generator")
    inspect.set_defaults(func=cmd_inspect)

    presets = sub.add_parser("presets", help="list the built-in behaviours")
    presets.set_defaults(func=cmd_presets)

    generate = sub.add_parser("generate", help="complete a prompt with steering")
    add_model_arguments(generate)
    add_steering_arguments(generate)
    generate.add_argument("--prompt", "-p", required=True)
    add_sampling_arguments(generate, 64)
    generate.add_argument("--compare", action="store_true", help="also show the unsteered completion")
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat in the terminal with live steering (/strength, /vectors, /reset)")
    add_model_arguments(chat)
    add_steering_arguments(chat)
    add_sampling_arguments(chat, 128)
    chat.set_defaults(func=cmd_chat)

    export = sub.add_parser("export", help="bake strength and layers into a plain file for llama.cpp")
    export.add_argument("file")
    export.add_argument("--for-llama-cpp", action="store_true", required=True, help="write a plain llama.cpp control vector")
    export.add_argument("--strength", type=float, required=True)
    export.add_argument("--layers", default=None, help="layers to keep (default: the vector's recommended layers)")
    export.add_argument("--raw", action="store_true", help="strength is a plain coefficient")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=cmd_export)

    from ggsteer.eval_cli import add_eval_commands

    add_eval_commands(sub)

    from ggsteer.server_cli import add_serve_command

    add_serve_command(sub)

    from ggsteer.bake_cli import add_bake_command

    add_bake_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from ggsteer.dataset import DatasetError
    from ggsteer.vector_file import VectorFileError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nggsteer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, DatasetError, VectorFileError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"ggsteer: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
