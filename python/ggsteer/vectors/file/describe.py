"""The summary `ggsteer inspect` prints for a control vector."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ggsteer.vectors.file.format import VectorFile
from ggsteer.vectors.file.schema import METADATA_KEYS, PER_LAYER_KEYS, show

# Median consistency (mean cosine between pair differences) at the recommended layers below which a
# vector is flagged as unlikely to steer (Braun et al. 2025, arXiv 2505.22637); chosen from
# measurement, see docs/efficient-training.md.
UNLIKELY_TO_STEER_CONSISTENCY = 0.02

# ---------------------------------------------------------------------------------------------
# Summary for `ggsteer inspect`


def describe_vector_file(vf: VectorFile) -> str:
    """A multi-line, human-readable summary of a control vector."""
    meta = vf.metadata
    lines = [
        f"model hint:  {vf.model_hint or '(none)'}",
        f"source:      {vf.source}" + (f" (format version {meta['version']})" if "version" in meta else ""),
        f"n_embd:      {vf.n_embd}",
        f"layers:      {len(vf.directions)} ({_format_layer_ranges(vf.layers)})",
    ]
    lines += _describe_scalars(meta)
    lines += _layer_table(vf)
    extra = sorted(key for key in meta if key not in METADATA_KEYS)
    lines += [f"other ggsteer.{key}: {show(meta[key])}" for key in extra]
    return "\n".join(lines)


def _describe_scalars(meta: dict[str, object]) -> list[str]:
    lines = []
    if "method" in meta:
        lines.append(f"method:      {meta['method']}" + (f" (pool: {meta['pool']})" if "pool" in meta else ""))
    if "unit" in meta:
        lines.append(f"unit:        {meta['unit']}")
    if "model_name" in meta:
        blocks = f" ({meta['n_layer']} layers)" if "n_layer" in meta else ""
        lines.append(f"model name:  {meta['model_name']}{blocks}")
    if "dataset_size" in meta or "dataset_hash" in meta:
        lines.append(f"dataset:     {meta.get('dataset_size', '?')} pairs, hash {meta.get('dataset_hash', '?')}")
    if "recommended_strength" in meta:
        lines.append(f"recommended strength: {meta['recommended_strength']:g}")
    if "recommended_layers" in meta:
        lines.append(f"recommended layers:   {_format_layer_ranges(meta['recommended_layers'])}")  # type: ignore[arg-type]
    if "tuned_op" in meta:
        recorded = {"tuned_kl", "tuned_max_kl"} <= set(meta)
        budget = f" (KL {meta['tuned_kl']:.3g} <= {meta['tuned_max_kl']:g})" if recorded else ""
        lines.append(f"tuned settings:       {meta['tuned_op']} on {meta['tuned_when']} tokens, layers "
                     f"{_format_layer_ranges(meta['tuned_layers'])}, strength {meta['tuned_strength']:g}{budget}")  # type: ignore[arg-type]
    lines += _describe_stability(meta)
    return lines


def _at_recommended(meta: dict[str, object], key: str) -> float | None:
    """Median of a per-layer key over the recommended layers (all layers without them)."""
    if key not in meta or "layers" not in meta:
        return None
    values = dict(zip(meta["layers"], meta[key]))  # type: ignore[call-overload]
    layers = meta.get("recommended_layers", meta["layers"])
    chosen = [values[il] for il in layers if il in values]  # type: ignore[union-attr]
    return float(np.median(chosen)) if chosen else None


def _describe_stability(meta: dict[str, object]) -> list[str]:
    lines = []
    stability = _at_recommended(meta, "stability")
    consistency = _at_recommended(meta, "consistency")
    if stability is not None:
        used = f" from {meta['pairs_used']} pairs" if "pairs_used" in meta else ""
        lines.append(f"stability:   {stability:.4f}{used} (median at the recommended layers: expected |cos| with the "
                     "direction of unlimited pairs)")
    if consistency is not None:
        lines.append(f"consistency: {consistency:.3f} (median mean cosine between pair differences)")
    warning = steerability_warning(meta)
    if warning:
        lines.append(f"warning:     {warning}")
    return lines


def steerability_warning(meta: dict[str, object]) -> str | None:
    """"this vector is unlikely to steer" where the pair differences are inconsistent; else None."""
    consistency = _at_recommended(meta, "consistency")
    if consistency is None or consistency >= UNLIKELY_TO_STEER_CONSISTENCY:
        return None
    return (f"this vector is unlikely to steer: its pair differences are inconsistent (median cosine "
            f"{consistency:.3f} < {UNLIKELY_TO_STEER_CONSISTENCY:g} at the recommended layers)")


def _layer_table(vf: VectorFile) -> list[str]:
    # float64: the norm of a finite float32 vector can overflow float32
    norms = {layer: float(np.linalg.norm(vector.astype(np.float64))) for layer, vector in vf.directions.items()}
    columns = [("norm", norms)]
    columns += [(key.replace("_", " "), vf.per_layer(key)) for key in PER_LAYER_KEYS if key in vf.metadata]
    header = f"{'layer':>6}" + "".join(f"{title:>17}" for title, _ in columns)
    rows = [
        f"{layer:>6}" + "".join(f"{_format_number(values.get(layer)):>17}" for _, values in columns)
        for layer in vf.layers
    ]
    return ["", header, *rows]


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_layer_ranges(layers: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    ordered = sorted(layers)
    runs: list[list[int]] = []
    for layer in ordered:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
