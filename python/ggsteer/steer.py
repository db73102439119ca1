"""Turn (vector, strength) requests into llama.cpp's control-vector buffer.

Plain addition goes through `llama_set_adapter_cvec`: llama.cpp adds a per-layer vector to each
block's output inside the graph, at no measurable cost. Its buffer starts at block 1 and must
always be given whole: a shorter buffer leaves the previous values of the missing layers behind.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ggsteer.vector import UNIT_RAW, ControlVector, default_steering_layers


@dataclass(frozen=True)
class Control:
    """One vector at one strength on a set of layers."""

    vector: ControlVector
    strength: float
    layers: tuple[int, ...]


def parse_layer_range(text: str) -> list[int]:
    """ "3-14" -> [3..14]; "5" -> [5]; "1,3,5-7" -> [1, 3, 5, 6, 7]."""
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"bad layer range {text!r}: use forms like 3-14, 5 or 1,3,5-7")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"bad layer range {part.strip()!r}: the end is before the start")
        layers.extend(range(first, last + 1))
    return layers


def make_control(
    vector: ControlVector, strength: float, n_layer: int, n_embd: int, layers: Iterable[int] | None = None, raw: bool = False
) -> Control:
    if not isinstance(vector, ControlVector):
        raise TypeError(f"expected a ControlVector, got {type(vector).__name__}")
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}")
    if vector.n_embd != n_embd:
        raise ValueError(
            f"vector has n_embd {vector.n_embd} but the model has n_embd {n_embd}: it was made for another model "
            f"({vector.model_hint})"
        )
    if vector.unit == UNIT_RAW and not raw:
        raise ValueError(
            "this vector has no per-layer gap (it was not trained by ggsteer, e.g. repeng or llama.cpp's "
            "cvector-generator wrote it), so a strength has no calibrated unit: pass raw=True (CLI: --raw) "
            "to use the strength as a plain coefficient"
        )
    chosen = _choose_layers(vector, n_layer, layers)
    return Control(vector, strength, tuple(chosen))


def _choose_layers(vector: ControlVector, n_layer: int, layers: Iterable[int] | None, allow_layer_zero: bool = False) -> list[int]:
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


def cvec_buffer(controls: Sequence[Control], n_layer: int, n_embd: int) -> tuple[np.ndarray, int, int]:
    """The full llama.cpp buffer [n_layer - 1, n_embd] (row il-1 is block il) and the steered range."""
    buffer = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    steered: set[int] = set()
    for control in controls:
        for il in control.layers:
            buffer[il - 1] += np.float32(control.strength) * control.vector.directions[il]
            steered.add(il)
    if not steered:
        return buffer, -1, -1
    return buffer, min(steered), max(steered)
