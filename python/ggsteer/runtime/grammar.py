"""A GBNF grammar constraining one sequence's tokens, through llama.cpp's grammar sampler.

The batch samples from its own copy of each sequence's logits, so the grammar is applied to that
copy: llama.cpp sets the logit of every token the grammar cannot take next to -inf (end of
generation only once the grammar is complete), and each chosen token is fed back to advance it.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from ggsteer.runtime.lifetime import NativeHandle

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class GrammarConstraint(NativeHandle):
    """One sequence's grammar sampler; freed by `close()`, a `with` block, or when collected."""

    def __init__(self, model, grammar: str, root: str = "root"):
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), root.encode("utf-8"))
        if not self._sampler:
            raise ValueError("the grammar does not parse (llama.cpp's log says where)")
        self.own(llama_cpp.llama_sampler_free, self._sampler)

    def allowed(self, logits: np.ndarray) -> np.ndarray | None:
        """`logits` (float64) with every token the grammar forbids now at -inf; None if it allows none."""
        self.require_open()
        data = np.zeros(logits.shape[0], dtype=_TOKEN_DATA)
        data["id"] = np.arange(logits.shape[0])
        data["logit"] = logits
        candidates = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=logits.shape[0],
            selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(candidates))
        if candidates.size != logits.shape[0]:
            raise RuntimeError("llama.cpp's grammar sampler changed the candidate count")
        constrained = logits.astype(np.float64)
        constrained[np.isneginf(data["logit"])] = -np.inf
        return None if np.isneginf(constrained).all() else constrained

    def accept(self, token: int) -> None:
        self.require_open()
        llama_cpp.llama_sampler_accept(self._sampler, token)
