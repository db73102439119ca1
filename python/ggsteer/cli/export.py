"""`ggsteer export`: bake strength and layers into a plain control-vector file for llama.cpp."""

from __future__ import annotations

import sys

from ggsteer.cli.common import CliError, layers_argument, output_path
from ggsteer.vectors import UNIT_RAW, ControlVector


def add_parser(sub) -> None:
    export = sub.add_parser(
        "export", help="bake strength and layers into a plain file for llama.cpp",
        description="Write a control vector whose directions are already multiplied by the strength and cut to the "
                    "layers, so `llama-cli --control-vector OUT.gguf` applies exactly that steering.",
    )
    export.add_argument("file", metavar="VECTOR.gguf", help="the control vector to export")
    # the only output format; the flag stays accepted for scripts written when it was required
    export.add_argument("--for-llama-cpp", action="store_true",
                        help="write a plain llama.cpp control vector (the default and only format)")
    export.add_argument("--strength", type=float, default=None,
                        help="steering strength to bake in (ggsteer's unit: 1.0 = the trained gap; with --raw a "
                             "plain coefficient); default: the vector's tuned strength (`ggsteer tune`)")
    export.add_argument("--layers", default=None,
                        help="layers to keep, e.g. 3-14 (default: the vector's tuned, else recommended layers)")
    export.add_argument("--raw", action="store_true",
                        help="strength is a plain coefficient (needed for files without a trained gap)")
    export.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="where to write the exported vector")
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=export_command)


def baked_vector(vector: ControlVector, strength: float, layers: list[int] | None, raw: bool) -> ControlVector:
    if vector.unit == UNIT_RAW and not raw:
        raise CliError("this vector has no trained gap (not written by ggsteer): "
                       "pass --raw to use the strength as a coefficient")
    tuned = vector.tuned_addition
    chosen = layers or (tuned.layers if tuned else None) or vector.recommended_layers or vector.layers
    chosen = [il for il in chosen if il != 0]
    baked = vector.select_layers(chosen) * strength
    baked.metadata = {"method": "exported", "unit": UNIT_RAW}
    return baked


def export_strength(vector: ControlVector, strength: float | None, path: str) -> float:
    """--strength, else the tuned strength; llama.cpp can only add on every token, so tuned settings
    with another op or gating are refused without an explicit --strength (and warned about with one)."""
    tuned = vector.tuned
    if tuned is not None and vector.tuned_addition is None:
        what = (f"{path}'s tuned settings ({tuned.op}, {tuned.when} tokens) cannot be expressed by llama.cpp, "
                "which only adds")
        if strength is None:
            raise CliError(f"{what}: pass --strength to export plain addition instead")
        print(f"ggsteer: warning: {what}: exporting plain addition at --strength {strength:g}", file=sys.stderr)
    if strength is not None:
        return strength
    if vector.tuned_addition is None:
        raise CliError(f"{path} has no tuned strength (run `ggsteer tune`): pass --strength")
    return vector.tuned_addition.strength


def export_command(args) -> int:
    output = output_path(args.output, args.force)
    source = ControlVector.load(args.file)
    args.strength = export_strength(source, args.strength, args.file)
    baked = baked_vector(source, args.strength, layers_argument(args.layers), args.raw)
    baked.save(output, overwrite=args.force)
    first, last = baked.layers[0], baked.layers[-1]
    print(f"wrote {output}: strength {args.strength:g} baked into layers {first}..{last}")
    print(f"llama-cli -m MODEL.gguf --control-vector {output}")
    if baked.layers == list(range(first, last + 1)):
        print(
            f"same as: llama-cli -m MODEL.gguf --control-vector-scaled {args.file} {args.strength:g} "
            f"--control-vector-layer-range {first} {last}"
        )
    return 0
