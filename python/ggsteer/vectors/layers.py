"""Layer numbers (parsing "3-14", the default steering range, choosing a vector's layers) and unit directions.

Layer i is the output of block i (llama.cpp's `l_out-i`, Hugging Face's `hidden_states[i + 1]`).
"""

from __future__ import annotations

import math
import re
from typing import Iterable

import numpy as np

# more blocks than any model has: a layer spec is refused past this before a range is expanded
MAX_LAYERS = 4096


def parse_layer_range(text: str, n_layer: int | None = None) -> list[int]:
    """ "3-14" -> [3..14]; "5" -> [5]; "1,3,5-7" -> [1, 3, 5, 6, 7] (sorted, each layer once).

    Every number is checked against `n_layer` (else MAX_LAYERS) before a range is expanded, so a
    short string never costs more than the model's layers."""
    limit = MAX_LAYERS if n_layer is None else n_layer
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"bad layer range {text[:40]!r}: use forms like 3-14, 5 or 1,3,5-7")
        first, last = (_layer_number(group, limit) for group in (match.group(1), match.group(2) or match.group(1)))
        if last < first:
            raise ValueError(f"bad layer range {part.strip()!r}: the end is before the start")
        layers.update(range(first, last + 1))
    return sorted(layers)


def _layer_number(digits: str, limit: int) -> int:
    # compared as text first: int() of thousands of digits is slow and Python refuses past 4300
    if len(digits) > len(str(limit)) or int(digits) >= limit:
        shown = digits if len(digits) <= 12 else f"{digits[:8]}... ({len(digits)} digits)"
        raise ValueError(f"layer {shown} is beyond the model: it has layers 0..{limit - 1}")
    return int(digits)


def default_steering_layers(n_layer: int) -> list[int]:
    """Middle layers, from 1/6 to 4/5 of the depth (3..14 of Gemma 3 270M's 18; docs/methods.md)."""
    first = max(1, round(n_layer / 6))
    last = max(first, math.floor(n_layer * 0.8))
    return list(range(first, min(last, n_layer - 1) + 1))


def default_training_layers(n_layer: int) -> list[int]:
    """Every layer llama.cpp can steer: 1..n_layer-1.

    llama.cpp keeps only output rows in the last block, so its captured rows must ask for logits;
    capture ends the graph right after the last captured layer, so they never run the output head.
    benchmarks/train.py measures the cost and benchmarks/last_layer.py whether steering it helps;
    recommended steering layers never include it.
    """
    return list(range(1, n_layer))


def choose_layers(vector, n_layer: int, layers: Iterable[int] | None, allow_layer_zero: bool = False) -> list[int]:
    """The layers to steer with `vector`: the given ones, else its recommended ones, else the defaults."""
    if layers is None:
        preferred = vector.recommended_layers or default_steering_layers(n_layer)
        chosen = [il for il in preferred if il in vector.directions] or [il for il in vector.layers if il >= 1]
    else:
        chosen = sorted({int(il) for il in layers})
    for il in chosen:
        if not 0 <= il < n_layer:
            raise ValueError(f"layer {il} is beyond the model: it has layers 0..{n_layer - 1}")
        if il == 0 and not allow_layer_zero:
            raise ValueError("layer 0 cannot be steered by llama.cpp's control-vector adapter (it starts at block 1)")
    missing = [il for il in chosen if il not in vector.directions]
    if missing:
        raise ValueError(f"layers {missing} are not in the vector (it has {vector.layers[0]}..{vector.layers[-1]})")
    return chosen


def unit_vector(vector: np.ndarray, problem: str = "the direction has zero or non-finite length") -> np.ndarray:
    """`vector / |vector|` (same dtype); ValueError(`problem`) when the length is zero or not finite."""
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(problem)
    return np.asarray(vector) / np.asarray(norm, dtype=np.asarray(vector).dtype)
