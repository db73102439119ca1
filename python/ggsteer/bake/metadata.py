"""The bake's record in the model file (`ggsteer.bake.*`), and its summary for `ggsteer inspect`."""

from __future__ import annotations

import os

from ggsteer.bake.gguf_layout import read_layout
from ggsteer.bake.gguf_rewrite import encode_record

PREFIX = "ggsteer.bake."


def bake_records(baked_ops, version: str) -> dict[str, bytes]:
    from ggsteer.bake.plan import format_layers

    values = {
        "version": version,
        "ops": [op.op for op in baked_ops],
        "vector_hashes": [op.vector_hash for op in baked_ops],
        "values": [float("nan") if op.value is None else float(op.value) for op in baked_ops],
        "layers": [format_layers(list(op.layers)) for op in baked_ops],
        "exact": [op.exact for op in baked_ops],
        "projections": [op.projection or "-" for op in baked_ops],
        "methods": [op.method for op in baked_ops],
    }
    return {PREFIX + key: encode_record(PREFIX + key, value) for key, value in values.items()}


def read_bake_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The ggsteer.bake.* keys of a model file ({} when it was not baked)."""
    layout = read_layout(path)
    return {key[len(PREFIX):]: value for key, value in layout.values.items() if key.startswith(PREFIX)}


def describe_bake(path: str | os.PathLike) -> str:
    """Lines for `ggsteer inspect MODEL.gguf`: what was baked into the model, or that nothing was."""
    meta = read_bake_metadata(path)
    if not meta:
        return "baked steering: none"
    lines = [f"baked steering (ggsteer {meta.get('version', '?')}):"]
    for k, op in enumerate(meta.get("ops", [])):
        value = meta["values"][k]
        shown = "" if value != value else f" {value:g}"  # NaN: ablate has no value
        kind = "exact" if meta["exact"][k] else "approximate"
        projection = meta["projections"][k]
        projection = "" if projection == "-" else f", {projection} projection"
        lines.append(f"  {op}{shown} at layers {meta['layers'][k]}, vector {meta['vector_hashes'][k]}: "
                     f"{kind}{projection} ({meta['methods'][k]})")
    return "\n".join(lines)
