"""Filling llama.cpp batches: one token per row, one sequence id per row."""

from __future__ import annotations

import llama_cpp


class OwnedBatch:
    """A llama_batch of up to `n_tokens` rows, freed on close."""

    def __init__(self, n_tokens: int):
        self.batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
        self.n_rows = 0

    def clear(self) -> None:
        self.n_rows = 0
        self.batch.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, wants_logits: bool) -> int:
        """Append one token of sequence `seq` at `pos`; returns its row."""
        row = self.n_rows
        batch = self.batch
        batch.token[row] = token
        batch.pos[row] = pos
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = seq
        batch.logits[row] = wants_logits
        self.n_rows += 1
        batch.n_tokens = self.n_rows
        return row

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
