"""Filling llama.cpp batches: one token per row, belonging to one sequence (or several sharing its KV cell)."""

from __future__ import annotations

import llama_cpp

from ggsteer.runtime.lifetime import NativeHandle


class BatchFullError(IndexError):
    """A row was added past the batch's capacity (the caller must defer it to the next decode)."""


class OwnedBatch(NativeHandle):
    """A llama_batch of up to `capacity` rows; writes past the end raise. Freed by `close()`, at the
    end of a `with` block, or when collected."""

    def __init__(self, capacity: int, seqs_per_row: int = 1):
        if capacity < 1:
            raise ValueError(f"a batch needs room for at least one row, got {capacity}")
        if seqs_per_row < 1:
            raise ValueError(f"a row belongs to at least one sequence, got seqs_per_row={seqs_per_row}")
        self.batch = llama_cpp.llama_batch_init(capacity, 0, seqs_per_row)
        self.own(llama_cpp.llama_batch_free, self.batch)
        self.capacity = capacity
        self.seqs_per_row = seqs_per_row
        self.n_rows = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n_rows

    def clear(self) -> None:
        self.n_rows = 0
        self.batch.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, wants_logits: bool) -> int:
        """Append one token of sequence `seq` at `pos`; returns its row."""
        return self.add_shared(token, pos, (seq,), wants_logits)

    def add_shared(self, token: int, pos: int, seqs: tuple[int, ...] | list[int], wants_logits: bool) -> int:
        """Append one token that belongs to every sequence in `seqs` (its KV cell is shared: a
        unified cache); the hook reads the row as the first sequence's. Returns its row."""
        self.require_open()
        row = self.n_rows
        if row >= self.capacity:
            raise BatchFullError(f"the batch holds {self.capacity} rows: row {row} does not fit")
        if not 1 <= len(seqs) <= self.seqs_per_row:
            raise ValueError(f"a row of this batch belongs to 1..{self.seqs_per_row} sequences, got {len(seqs)}")
        batch = self.batch
        batch.token[row] = token
        batch.pos[row] = pos
        batch.n_seq_id[row] = len(seqs)
        for k, seq in enumerate(seqs):
            batch.seq_id[row][k] = seq
        batch.logits[row] = wants_logits
        self.n_rows += 1
        batch.n_tokens = self.n_rows
        return row
