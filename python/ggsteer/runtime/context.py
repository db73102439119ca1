"""ggsteer's handle on a hooked model's llama_context: decodes, the KV cache, logits, the adapter.

Every layer above runtime/ goes through a `Context` instead of calling llama_cpp's C API. A
decode briefs the native hook on its rows first and reports llama.cpp's status as llama.h
defines it for llama_decode: 1 no KV slot for the batch, 2 aborted, -1 invalid input batch,
< -1 a fatal error. The Context does not own the llama_context: llama-cpp-python's
`Llama` frees it (before its model) when the model closes; from then on a Context call raises
instead of touching freed memory.

Sequence ids and positions follow llama.h: a negative `p0` means "from the start", a negative
`p1` "to the end"; `seq_rm` with a negative sequence matches every sequence.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp
import numpy as np


class HookError(RuntimeError):
    """The eval callback refused a decode (a layer seen twice, a bad row plan, ...)."""


class DecodeError(RuntimeError):
    """llama_decode returned a non-zero status; `status` is llama.cpp's code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class KVCacheFullError(DecodeError):
    """Status 1: no KV slot for the batch (the cache is full; nothing of the batch was kept)."""


class DecodeAbortedError(DecodeError):
    """Status 2: the abort callback stopped the decode (ubatches already computed stay cached)."""


class InvalidBatchError(DecodeError):
    """Status -1: llama.cpp refused the batch (a token outside the vocabulary, a bad sequence id, ...)."""


_STATUS_ERRORS = {
    1: (KVCacheFullError, "the KV cache is full; raise n_ctx or decode fewer tokens at once"),
    2: (DecodeAbortedError, "the decode was aborted"),
    -1: (InvalidBatchError, "invalid input batch (llama.cpp's log names the bad token or sequence id)"),
}


def decode_error(status: int) -> DecodeError | None:
    """The error for a llama_decode status, as llama.h defines the codes; None for 0 (success)."""
    if status == 0:
        return None
    kind, meaning = _STATUS_ERRORS.get(status, (DecodeError, "fatal error inside llama.cpp"))
    if status > 2:
        meaning = "unknown warning status"
    return kind(status, f"llama_decode failed with status {status}: {meaning}")


class Context:
    """The llama_context of a model whose eval callback is `hook` (see hooked_context)."""

    def __init__(self, owner: Any, hook: Any, n_vocab: int, architecture: str = "unknown"):
        self._owner = owner  # llama-cpp-python's LlamaContext: it frees the pointer
        self.hook = hook
        self.n_vocab = n_vocab
        self.architecture = architecture

    @property
    def pointer(self) -> Any:
        """The raw llama_context pointer (for llama_cpp calls inside runtime/ only)."""
        ctx = getattr(self._owner, "ctx", None)
        if ctx is None:
            raise ValueError("the model is closed: its llama.cpp context was freed")
        return ctx

    def _memory(self) -> Any:
        return llama_cpp.llama_get_memory(self.pointer)

    def n_seq_max(self) -> int:
        return int(llama_cpp.llama_n_seq_max(self.pointer))

    def n_ctx(self) -> int:
        return int(llama_cpp.llama_n_ctx(self.pointer))

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, batch: llama_cpp.llama_batch, generated: Any = False) -> None:
        """llama_decode on a filled llama_batch, describing its rows to the hook first.

        Rows are read off the batch: slot = first sequence id, position, outputs where logits are
        requested; `generated` (bool or per-row array) marks generated tokens. Raises HookError
        when the hook refused the decode, else a DecodeError subclass for a non-zero status.
        """
        n = batch.n_tokens
        positions = np.ctypeslib.as_array(batch.pos, shape=(n,)).astype(np.int32) if n else np.zeros(0, np.int32)
        slots = np.array([batch.seq_id[i][0] for i in range(n)], dtype=np.int32)
        flags_in = np.ctypeslib.as_array(batch.logits, shape=(n,)) if n else np.zeros(0, np.int8)
        outputs = np.flatnonzero(flags_in).astype(np.int32)
        flags = np.broadcast_to(np.asarray(generated, dtype=np.uint8), (n,))
        self.hook.set_rows(slots, positions, np.ascontiguousarray(flags), outputs)
        try:
            status = llama_cpp.llama_decode(self.pointer, batch)
        finally:
            self.hook.clear_rows()
        error = self.hook.take_error()
        if error:
            raise HookError(f"llama_decode failed with status {status}: "
                            f"ggsteer hook ({self.architecture} architecture): {error}")
        failure = decode_error(status)
        if failure is not None:
            raise failure

    # -- the KV cache -----------------------------------------------------------------------
    def clear_memory(self) -> None:
        """Empty the KV cache (metadata and data) of every sequence."""
        llama_cpp.llama_memory_clear(self._memory(), True)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove `seq`'s cells at positions [p0, p1); False if a partial removal is impossible."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory(), seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Let `dst` share `src`'s cells at positions [p0, p1) (free in a unified cache)."""
        llama_cpp.llama_memory_seq_cp(self._memory(), src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        """Drop every cell that does not belong to `seq`."""
        llama_cpp.llama_memory_seq_keep(self._memory(), seq)

    def seq_pos_min(self, seq: int) -> int:
        """Smallest cached position of `seq`, -1 when it has none."""
        return int(llama_cpp.llama_memory_seq_pos_min(self._memory(), seq))

    def seq_pos_max(self, seq: int) -> int:
        """Largest cached position of `seq`, -1 when it has none."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory(), seq))

    # -- outputs ----------------------------------------------------------------------------
    def logits_ith(self, i: int) -> np.ndarray | None:
        """The logits of batch row `i` of the last decode (negative: the i-th output from the end), a
        float32 view valid until the next decode; None (and an error line in llama.cpp's log) when
        that row asked for no logits."""
        pointer = llama_cpp.llama_get_logits_ith(self.pointer, i)
        if not pointer:
            return None
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def logits(self, n_outputs: int) -> np.ndarray:
        """All `n_outputs` logits rows of the last decode, in batch order (llama.h stores them
        contiguously), as a float32 view valid until the next decode."""
        pointer = llama_cpp.llama_get_logits(self.pointer)
        if not pointer:
            raise ValueError("the last decode produced no logits")
        return np.ctypeslib.as_array(pointer, shape=(n_outputs, self.n_vocab))

    # -- llama.cpp's control-vector adapter -------------------------------------------------
    def set_adapter_cvec(self, buffer: np.ndarray | None, n_embd: int, il_start: int = -1, il_end: int = -1) -> None:
        """Add `buffer` (float32, one n_embd row per layer from layer 1 on) to layers
        il_start..il_end inside llama.cpp's graph; None clears the adapter."""
        if buffer is None:
            status = llama_cpp.llama_set_adapter_cvec(self.pointer, None, 0, n_embd, -1, -1)
        else:
            data = np.ascontiguousarray(buffer, dtype=np.float32)
            pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = llama_cpp.llama_set_adapter_cvec(self.pointer, pointer, data.size, n_embd, il_start, il_end)
        if status != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed with status {status}")
