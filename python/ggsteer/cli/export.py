"""`ggsteer export`: bake strength and layers into a plain control-vector file for llama.cpp."""

from __future__ import annotations

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
    export.add_argument("--strength", type=float, required=True,
                        help="steering strength to bake in (ggsteer's unit: 1.0 = the trained gap; with --raw a "
                             "plain coefficient)")
    export.add_argument("--layers", default=None,
                        help="layers to keep, e.g. 3-14 (default: the vector's recommended layers)")
    export.add_argument("--raw", action="store_true",
                        help="strength is a plain coefficient (needed for files without a trained gap)")
    export.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="where to write the exported vector")
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=export_command)


def baked_vector(vector: ControlVector, strength: float, layers: list[int] | None, raw: bool) -> ControlVector:
    if vector.unit == UNIT_RAW and not raw:
        raise CliError("this vector has no trained gap (not written by ggsteer): "
                       "pass --raw to use the strength as a coefficient")
    chosen = layers or vector.recommended_layers or vector.layers
    chosen = [il for il in chosen if il != 0]
    baked = vector.select_layers(chosen) * strength
    baked.metadata = {"method": "exported", "unit": UNIT_RAW}
    return baked


def export_command(args) -> int:
    output = output_path(args.output, args.force)
    source = ControlVector.load(args.file)
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
