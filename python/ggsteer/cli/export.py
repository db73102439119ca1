"""`ggsteer export --for-llama-cpp`: bake strength and layers into a plain control-vector file."""

from __future__ import annotations

from ggsteer.cli.common import CliError, layers_argument, output_path
from ggsteer.vectors import UNIT_RAW, ControlVector


def add_parser(sub) -> None:
    export = sub.add_parser("export", help="bake strength and layers into a plain file for llama.cpp")
    export.add_argument("file")
    export.add_argument("--for-llama-cpp", action="store_true", required=True, help="write a plain llama.cpp control vector")
    export.add_argument("--strength", type=float, required=True)
    export.add_argument("--layers", default=None, help="layers to keep (default: the vector's recommended layers)")
    export.add_argument("--raw", action="store_true", help="strength is a plain coefficient")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--force", action="store_true", help="overwrite an existing output file")
    export.set_defaults(func=export_command)


def baked_vector(vector: ControlVector, strength: float, layers: list[int] | None, raw: bool) -> ControlVector:
    if vector.unit == UNIT_RAW and not raw:
        raise CliError("this vector has no trained gap (not written by ggsteer): pass --raw to use the strength as a coefficient")
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
