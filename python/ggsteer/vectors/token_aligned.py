"""TokenAlignedVector: ActAdd's one-vector-per-position steering at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenAlignedVector:
    """ActAdd: one vector per position at one layer, added to the first positions of a sequence."""

    layer: int
    rows: np.ndarray  # float32 [n_positions, n_embd]
    model_hint: str = ""

    @property
    def n_embd(self) -> int:
        return int(self.rows.shape[1])
