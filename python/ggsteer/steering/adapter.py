"""Plain addition as llama.cpp's control-vector buffer (`llama_set_adapter_cvec`).

llama.cpp adds a per-layer vector to each block's output inside the graph, at no measurable cost.
Its buffer starts at block 1 and must always be given whole: a shorter buffer leaves the previous
values of the missing layers behind. Like llama.cpp's `common/` loader feeding its adapter, this
module only turns vectors into a float buffer; files are read elsewhere (vectors/file/).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ggsteer.steering.interventions import Intervention


def cvec_buffer(additions: Sequence[Intervention], n_layer: int, n_embd: int) -> tuple[np.ndarray, int, int]:
    """The full llama.cpp buffer [n_layer - 1, n_embd] (row il-1 is block il) and the steered range."""
    buffer = np.zeros((n_layer - 1, n_embd), dtype=np.float32)
    steered: set[int] = set()
    for item in additions:
        if not item.is_plain_add:
            raise ValueError(f"llama.cpp's adapter only adds on every token; got op {item.op!r}, when {item.when!r}")
        for il in item.layers:
            buffer[il - 1] += np.float32(item.strength) * item.vector.directions[il]
            steered.add(il)
    if not steered:
        return buffer, -1, -1
    return buffer, min(steered), max(steered)
