"""`ggsteer inspect`: a vector file's metadata, layers, norms, separation and gap."""

from __future__ import annotations

from ggsteer.cli.bake import describe_baked_model
from ggsteer.vectors.file import describe_vector_file, read_vector_file


def add_parser(sub) -> None:
    inspect = sub.add_parser("inspect", help="print a vector file's metadata, layers, norms and separation")
    inspect.add_argument("file")
    inspect.add_argument("--layer-offset", type=int, default=0, help="-1 for files from llama.cpp's cvector-generator")
    inspect.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    baked = describe_baked_model(args.file)  # a model GGUF: what ggsteer bake wrote into it
    if baked is not None:
        print(f"file:        {args.file}")
        print(baked)
        return 0
    vf = read_vector_file(args.file, layer_offset=args.layer_offset)
    print(f"file:        {args.file}")
    print(describe_vector_file(vf))
    return 0
