"""What the subcommands share: the error type, argument groups, and loading models and vectors."""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path

import numpy as np

from ggsteer.atomic_file import check_destination
from ggsteer.model import SteeredModel
from ggsteer.runtime.rpc import RpcWorkerError, parse_endpoints
from ggsteer.runtime.sampler import SEED_MASK
from ggsteer.sampling import DEFAULTS, MAX_TEMPERATURE, check_settings
from ggsteer.steering.interventions import default_strength
from ggsteer.steering.options import CLI, OPTIONS, OptionError, options_for, parse_condition_fields, parse_strength
from ggsteer.vectors import ControlVector, parse_layer_range


class CliError(Exception):
    """A user error worth one clear line, not a traceback."""


# -- shared helpers -------------------------------------------------------------------------


def parse_vector_spec(spec: str) -> tuple[Path, float | None]:
    """`FILE` or `FILE:STRENGTH` (a path that exists as given is never split)."""
    if os.path.exists(spec) or ":" not in spec:
        return Path(spec), None
    path, _, text = spec.rpartition(":")
    strength = finite_number(text,
                             f"bad --vector {spec!r}: expected FILE or FILE:STRENGTH with a number after the colon",
                             f"bad --vector {spec!r}: the strength must be a finite number")
    try:
        strength = parse_strength(strength)
    except OptionError as error:
        raise CliError(f"bad --vector {spec!r}: {error}") from None
    if not path:
        raise CliError(f"bad --vector {spec!r}: the file name is missing")
    return Path(path), strength


def finite_number(text: str, not_a_number: str, not_finite: str) -> float:
    """float(text), or a CliError with the matching message."""
    try:
        value = float(text)
    except ValueError:
        raise CliError(not_a_number) from None
    if not math.isfinite(value):
        raise CliError(not_finite)
    return value


def load_model(args, **kwargs):
    threads = getattr(args, "threads", None) or os.cpu_count()
    kwargs.update(rpc_model_arguments(args))
    # n_threads_batch too: prompt and batched decodes (training, sweeps) would use every core
    try:
        return SteeredModel(args.model, n_threads=threads, n_threads_batch=threads,
                            n_gpu_layers=getattr(args, "gpu_layers", 0),
                            verbose=getattr(args, "verbose", False), **kwargs)
    except RpcWorkerError as error:
        raise CliError(str(error)) from None


def rpc_model_arguments(args) -> dict:
    """SteeredModel keywords from --rpc and --tensor-split."""
    endpoints = getattr(args, "rpc", None)
    split = getattr(args, "tensor_split", None)
    if split is not None and not endpoints:
        raise CliError("--tensor-split needs --rpc (it splits the layers between the RPC workers)")
    if not endpoints:
        return {}
    if split is not None and len(split) != len(endpoints):
        raise CliError(f"--tensor-split has {len(split)} values for {len(endpoints)} --rpc workers")
    return {"rpc_servers": endpoints, "tensor_split": split}


def rpc_list(text: str) -> list[str]:
    try:
        return parse_endpoints(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def proportions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --tensor-split {text!r}: expected numbers like 3,1") from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"bad --tensor-split {text!r}: proportions must be >= 0, not all 0")
    return values


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to the GPU (llama.cpp's -ngl)")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's log lines (errors are always shown)")
    parser.add_argument("--rpc", type=rpc_list, default=None, metavar="HOST:PORT,...",
                        help="run the layers on these `ggsteer rpc-server` workers (all layers unless --gpu-layers)")
    parser.add_argument("--tensor-split", type=proportions, default=None, metavar="P1,P2,...",
                        help="with --rpc: share of the layers per worker, e.g. 3,1 (default: by free memory)")


# the CLI spells the op by the flag a vector is given with
OP_FLAGS = {"add": "--vector", "ablate": "--ablate", "clamp": "--clamp"}


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    """--vector/--ablate/--clamp (vector, strength, op) and one argument per steering option the CLI
    takes (steering/options.py: its flag, help, default and bounds)."""
    parser.add_argument(OP_FLAGS["add"], "-v", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="control vector and strength (default: its recommended strength, else 1.0); repeatable")
    parser.add_argument(OP_FLAGS["ablate"], action="append", default=[], metavar="FILE",
                        help="project this vector's direction out of the residual stream; repeatable")
    parser.add_argument(OP_FLAGS["clamp"], action="append", default=[], metavar="FILE:VALUE",
                        help="hold the projection on this vector at VALUE (in strength units; 0 = ablate); repeatable")
    for option in options_for(CLI):
        if option.cli_flag is None:
            continue
        default = f" (default: {option.default_text or option.default})"
        if option.kind == "flag":
            parser.add_argument(option.cli_flag, action="store_true", help=option.help)
        elif option.kind == "choice":
            parser.add_argument(option.cli_flag, choices=option.choices, default=option.default,
                                help=option.help + default)
        else:
            metavar = "FILE:THRESHOLD:LAYER" if option.kind == "condition" else None
            parser.add_argument(option.cli_flag, type=_cli_type(option.name), default=option.default,
                                metavar=metavar, help=option.help + default)


def _cli_type(name: str):
    """An argparse type that parses the text as the option defines it (an error before any model loads)."""
    option = OPTIONS[name]

    def convert(text: str):
        try:
            if option.kind == "condition":
                return _condition_argument(text)
            if option.kind == "integer":
                return option.parse(_integer_text(name, text))
            option.parse(text)  # layers: checked now, read again with the model's size by layers_argument
            return text
        except OptionError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name  # argparse names the type in "invalid <name> value"
    return convert


def _integer_text(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise OptionError(name, f"{name} must be an integer, got {text!r}") from None


def _condition_argument(text: str) -> tuple[Path, float, int]:
    path, threshold, layer = ([""] * 3 + text.rsplit(":", 2))[-3:]
    try:
        threshold_value = float(threshold)
    except ValueError:
        raise OptionError("condition", f"bad --condition {text!r}: expected FILE:THRESHOLD:LAYER") from None
    if not path:
        raise OptionError("condition", f"bad --condition {text!r}: expected FILE:THRESHOLD:LAYER")
    _, threshold_value, layer_value = parse_condition_fields((path, threshold_value, _integer_text("layer", layer)))
    return Path(path), threshold_value, layer_value


def add_sampling_arguments(parser: argparse.ArgumentParser, n_default: int) -> None:
    """llama.cpp's sampling options, named and defaulting as in llama-cli (ggsteer.sampling.DEFAULTS)."""
    group = parser.add_argument_group("sampling (llama.cpp's sampler chain; defaults are llama.cpp's)")
    group.add_argument("-n", "--max-tokens", type=int, default=n_default,
                       help=f"tokens to generate at most (default: {n_default})")
    group.add_argument("--temp", type=float, default=DEFAULTS.temperature,
                       help=f"temperature; 0 = greedy (default: {DEFAULTS.temperature:g})")
    group.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                       help=f"keep the k most likely tokens; 0 = off (default: {DEFAULTS.top_k})")
    group.add_argument("--top-p", type=float, default=DEFAULTS.top_p,
                       help=f"nucleus sampling; 1 = off (default: {DEFAULTS.top_p:g})")
    group.add_argument("--min-p", type=float, default=DEFAULTS.min_p,
                       help=f"drop tokens below this share of the top token's probability; 0 = off "
                            f"(default: {DEFAULTS.min_p:g})")
    group.add_argument("--repeat-penalty", type=float, default=DEFAULTS.repeat_penalty,
                       help=f"penalize tokens seen in the last --repeat-last-n tokens; 1 = off "
                            f"(default: {DEFAULTS.repeat_penalty:g})")
    group.add_argument("--repeat-last-n", type=int, default=DEFAULTS.repeat_last_n,
                       help=f"tokens (prompt included) the penalty looks back over; 0 = off, -1 = the context "
                            f"(default: {DEFAULTS.repeat_last_n})")
    group.add_argument("--seed", type=int, default=None, help="random seed (default: a new one each run)")


def load_vectors(specs: list[str]):
    """[(name, ControlVector, strength)] from --vector arguments."""
    loaded = []
    for spec in specs:
        path, strength = parse_vector_spec(spec)
        vector = ControlVector.load(path)
        if strength is None:
            strength = default_strength(vector)
        loaded.append((path.stem, vector, strength))
    return loaded


def steering_interventions(model, args, vectors) -> list:
    """Interventions from --vector/--ablate/--clamp/--when/--layers/--raw."""
    layers = layers_argument(args.layers, model.n_layer)
    common = dict(layers=layers, raw=args.raw, when=args.when, first_k=args.first_k, skip_first=args.skip_first,
                  condition=condition_argument(args.condition))
    items = [model.intervention(vector, strength, **common) for _, vector, strength in vectors]
    for path in args.ablate:
        items.append(model.intervention(ControlVector.load(path), 1.0, op="ablate", **common))
    for spec in args.clamp:
        path, value = parse_vector_spec(spec)
        if value is None:
            raise CliError(f"bad --clamp {spec!r}: expected FILE:VALUE")
        items.append(model.intervention(ControlVector.load(path), value, op="clamp", **common))
    return items


def layers_argument(text: str | None, n_layer: int | None = None):
    return None if text is None else parse_layer_range(text, n_layer)


def condition_argument(condition: tuple[Path, float, int] | None):
    """--condition FILE:THRESHOLD:LAYER with its vector loaded, as make_intervention takes it."""
    if condition is None:
        return None
    path, threshold, layer = condition
    return ControlVector.load(path), threshold, layer



def check_sampling_arguments(args) -> None:
    """One clear line for sampling settings that would generate without limit or make no sense
    (checked before the model loads)."""
    if args.max_tokens < 1:
        raise CliError(f"-n/--max-tokens must be at least 1, got {args.max_tokens}")
    if not (math.isfinite(args.temp) and 0.0 <= args.temp <= MAX_TEMPERATURE):
        raise CliError(f"--temp must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {args.temp:g}")
    if not (math.isfinite(args.repeat_penalty) and args.repeat_penalty > 0.0):
        raise CliError(f"--repeat-penalty must be a positive number (1 = none), got {args.repeat_penalty:g}")
    try:
        check_settings(args.max_tokens, args.temp, args.top_k, args.top_p, args.min_p, args.repeat_penalty,
                       args.repeat_last_n, 0.0, 0.0)
    except ValueError as error:
        name, _, rest = str(error).partition(" ")
        raise CliError(f"--{name.replace('_', '-')} {rest}") from None


# no model's residual stream comes near this: a steering vector that adds more is a broken file or strength
ABSURD_STEERING = 1e6


def warn_if_steering_is_absurd(vectors) -> None:
    """One warning line per --vector whose values times strength are absurdly large (or overflow)."""
    for name, vector, strength in vectors:
        peak = max(float(np.max(np.abs(d), initial=0.0)) for d in vector.directions.values()) * abs(strength)
        if not math.isfinite(peak) or peak > ABSURD_STEERING:
            print(f"ggsteer: warning: {name} at strength {strength:g} adds values up to {peak:.3g} to the residual "
                  f"stream (a model's own stay far below {ABSURD_STEERING:g}): expect meaningless output",
                  file=sys.stderr)


def sampling_kwargs(args) -> dict:
    """generate_batch's settings from the sampling arguments; without --seed one is drawn (both sides
    of --compare share it)."""
    seed = random.randrange(SEED_MASK) if args.seed is None else args.seed
    return {"max_tokens": args.max_tokens, "temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n,
            "seed": seed}


def llama_cpp_usage_line(model_path, vector_path, vector, strength: float = 0.5) -> str:
    layers = vector.recommended_layers or vector.layers
    return (
        f"use it with llama.cpp: llama-cli -m {model_path} --control-vector-scaled {vector_path} {strength:g} "
        f"--control-vector-layer-range {min(layers)} {max(layers)}"
    )


def output_path(path: str, force: bool, what: str = "output file") -> Path:
    """Check an output path before any work starts; one clear line when it cannot be written."""
    try:
        return check_destination(path, overwrite=force, what=what)
    except FileExistsError:
        raise CliError(f"{path} already exists: pass --force to overwrite it") from None
    except IsADirectoryError:
        raise CliError(f"{path} is a directory: give a file name for the {what}") from None
    except FileNotFoundError as error:
        raise CliError(f"cannot write {path}: the folder {error.filename} does not exist") from None


def check_writable(path: str | os.PathLike | None, what: str) -> None:
    """Fail now, not after the sweep, when `path` cannot be written."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise CliError(f"cannot write {what} {target}: the directory {folder} does not exist")
    if target.is_dir():
        raise CliError(f"cannot write {what} {target}: it is a directory")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise CliError(f"cannot write {what} {target}: permission denied")


def write_output(path: str, what: str, write) -> None:
    """Run `write()`; an OSError becomes one clear line naming `what` and `path`."""
    try:
        write()
    except OSError as error:
        raise CliError(f"cannot write {what} {path}: {error.strerror or error}") from None
