"""Bake steering into a model GGUF, so any llama.cpp-based app runs it with no flag.

`bake_model(model, output, add=[(vector, 0.6)], ablate=[vector], clamp=[(vector, 1.0)])` writes a
copy of the model whose weights carry the steering; `describe_bake(path)` summarises what a model
file has baked in. See plan.py for what is exact where.
"""

from ggsteer.bake.apply import BakeReport, bake_model
from ggsteer.bake.gguf_layout import ModelFileError
from ggsteer.bake.metadata import describe_bake, read_bake_metadata
from ggsteer.bake.plan import BakeError

__all__ = ["BakeError", "BakeReport", "ModelFileError", "bake_model", "describe_bake", "read_bake_metadata"]
