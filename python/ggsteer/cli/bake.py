"""`ggsteer bake`: write a model GGUF with steering built into its weights (python/ggsteer/bake/)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ggsteer.bake import ModelFileError, bake_model, describe_bake
from ggsteer.bake.gguf_layout import read_layout
from ggsteer.cli.common import CliError, layers_argument, parse_vector_spec
from ggsteer.steering.interventions import default_strength
from ggsteer.vectors import ControlVector


def add_parser(subparsers) -> None:
    """Register `ggsteer bake` on the `ggsteer` parser."""
    bake = subparsers.add_parser(
        "bake",
        help="write a copy of a model GGUF with the steering in its weights (for ollama, LM Studio, koboldcpp)",
    )
    bake.add_argument("model", metavar="MODEL.gguf", help="the model to bake into (it is not modified)")
    bake.add_argument("--vector", "-v", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="add this vector at STRENGTH (default: its recommended strength, else 1.0); repeatable")
    bake.add_argument("--ablate", action="append", default=[], metavar="FILE",
                      help="project this vector's direction out of the weights; repeatable")
    bake.add_argument("--clamp", action="append", default=[], metavar="FILE:VALUE",
                      help="hold the projection on this vector at VALUE (strength units); repeatable")
    bake.add_argument("--layers", default=None,
                      help="layers to bake, e.g. 3-14 (default: each vector's recommended layers)")
    bake.add_argument("--approximate", action="store_true",
                      help="where the architecture cannot hold the steering exactly, bake the nearest edit")
    bake.add_argument("-o", "--output", required=True, metavar="OUT.gguf",
                      help="the baked model to write (never over an existing file without --force)")
    bake.add_argument("--force", action="store_true", help="overwrite an existing output file")
    bake.set_defaults(func=cmd_bake)


def cmd_bake(args) -> int:
    adds = [_load(path, strength) for path, strength in map(parse_vector_spec, args.vector)]
    for vector, strength in adds:
        _warn_if_tuned_op_cannot_bake(vector, strength)
    # the tuned strength only where the tuned settings are plain addition on every token (what weights hold)
    adds = [(vector, _bake_strength(vector) if strength is None else strength) for vector, strength in adds]
    ablates = [_load(Path(path), None)[0] for path in args.ablate]
    clamps = []
    for spec in args.clamp:
        path, value = parse_vector_spec(spec)
        if value is None:
            raise CliError(f"bad --clamp {spec!r}: expected FILE:VALUE")
        clamps.append(_load(path, value))
    if not (adds or ablates or clamps):
        raise CliError("nothing to bake: give --vector, --ablate or --clamp")
    report = bake_model(args.model, args.output, add=adds, ablate=ablates, clamp=clamps,
                        layers=layers_argument(args.layers), approximate=args.approximate, force=args.force)
    print(report.summary())
    return 0


def _load(path: Path, value):
    if not os.path.exists(path):
        raise CliError(f"vector file not found: {path}")
    return ControlVector.load(path), value


def describe_baked_model(path) -> str | None:
    """For `ggsteer inspect`: what a model GGUF has baked in, or None when `path` is not a model file."""
    try:
        architecture = read_layout(path).architecture
    except ModelFileError:
        return None  # not a readable model: the vector-file reader says what is wrong
    if architecture in ("", "controlvector"):
        return None
    return f"model:       {architecture}\n{describe_bake(path)}"


def _warn_if_tuned_op_cannot_bake(vector, strength) -> None:
    tuned = vector.tuned
    if tuned is not None and vector.tuned_addition is None and strength is None:
        print(f"ggsteer: warning: the vector's tuned settings ({tuned.op}, {tuned.when} tokens) cannot be baked into "
              "weights, which only add on every token: baking plain addition at its recommended strength and layers",
              file=sys.stderr)


def _bake_strength(vector) -> float:
    return default_strength(vector, None if vector.tuned_addition else "add")
