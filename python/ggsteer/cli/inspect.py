"""`ggsteer inspect`: a vector file's metadata, layers, norms, separation and gap."""

from __future__ import annotations

import argparse

from ggsteer.cli.bake import describe_baked_model
from ggsteer.vectors.file import describe_vector_file, read_vector_file

COLUMNS = """columns of the layer table (a column is shown when the file has it):
  layer            the block whose output the direction is added to (llama.cpp's l_out-i, 0-based)
  norm             length of the stored direction: the push at strength 1
  separation       how well the direction told the training pairs apart at that layer (0.5 = chance, 1 = every pair)
  gap              mean projection of positive minus negative prompts on the unit direction: ggsteer's strength 1
  residual norm    typical length of the residual stream at that layer, to set the norm against
  center           mean projection of the pairs' midpoints on the direction: its neutral point
  ablation center  the neutral point along the direction ablate and clamp act on (the pairs' difference without
                   the directions every token shares; see docs/interventions.md)
  ablation gap     the gap along that direction: clamp's unit
  stability        expected |cos| between this direction and the one unlimited pairs would give (from split
                   halves): near 1, more pairs would not change it
  consistency      mean cosine between the pairs' differences (near 0: unlikely to steer)"""


def add_parser(sub) -> None:
    inspect = sub.add_parser(
        "inspect", help="print a vector file's metadata, layers, norms and separation",
        description="Print a control-vector file's metadata and one row per layer, or, for a model GGUF that "
                    "`ggsteer bake` wrote, what was baked into it.",
        epilog=COLUMNS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("file", metavar="FILE.gguf",
                         help="a control-vector GGUF, or a model GGUF written by ggsteer bake")
    inspect.add_argument("--layer-offset", type=int, default=0,
                         help="add this to every layer number as the file is read: -1 for files from llama.cpp's "
                              "cvector-generator, which writes the vector measured at layer i as direction.(i+1) "
                              "(default 0)")
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
