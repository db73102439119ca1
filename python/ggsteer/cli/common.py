"""What the subcommands share: the error type, argument groups, and loading models and vectors."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ggsteer.atomic_file import check_destination
from ggsteer.model import SteeredModel
from ggsteer.steering.interventions import MAX_ABS_STRENGTH, default_strength
from ggsteer.vectors import ControlVector, parse_layer_range


class CliError(Exception):
    """A user error worth one clear line, not a traceback."""


# -- shared helpers -------------------------------------------------------------------------


def parse_vector_spec(spec: str) -> tuple[Path, float | None]:
    """`FILE` or `FILE:STRENGTH` (a path that exists as given is never split)."""
    if os.path.exists(spec) or ":" not in spec:
        return Path(spec), None
    path, _, text = spec.rpartition(":")
    strength = finite_number(text, f"bad --vector {spec!r}: expected FILE or FILE:STRENGTH with a number after the colon",
                             f"bad --vector {spec!r}: the strength must be a finite number")
    if abs(strength) > MAX_ABS_STRENGTH:
        raise CliError(f"bad --vector {spec!r}: a strength of {strength:g} would destroy the text; "
                       f"use a value within +-{MAX_ABS_STRENGTH:g} (1.0 = the trained gap)")
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
    return None if text is None else parse_layer_range(text)


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed, repeat_penalty=args.repeat_penalty)


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
