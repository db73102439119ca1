"""One sequence's sampler: a llama.cpp `llama_sampler_chain_*` chain, built as llama-server builds one.

The chain runs, in llama.cpp's default order: logit bias, penalties (repeat / presence / frequency
over the last `repeat_last_n` tokens, prompt included), top-k, top-p, min-p, temperature and `dist`
with the seed; at temperature 0 it ends in `greedy` instead. A grammar is a separate llama.cpp
grammar sampler applied before the chain, so the token is drawn from the grammar's allowed set.

The batch copies each sequence's logits out of the context (a later decode overwrites them), so the
chain samples from that copy through a `llama_token_data_array`, not from the context.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np

from ggsteer.runtime.grammar import grammar_sampler
from ggsteer.runtime.lifetime import NativeHandle

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
SEED_MASK = 0xFFFFFFFF  # llama.cpp's seeds are 32-bit; 0xFFFFFFFF asks it for a random one
RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED


@dataclass(frozen=True)
class ChainOptions:
    """What the chain is built from (llama.cpp's meanings: top_k <= 0, top_p 1, min_p 0, repeat_penalty 1
    and repeat_last_n 0 switch a step off; repeat_last_n -1 means the whole context)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: tuple[tuple[int, float], ...]
    seed: int | None
    grammar: str | None


def _free(samplers) -> None:
    chain, grammar = samplers
    llama_cpp.llama_sampler_free(chain)  # frees the samplers added to it too
    if grammar:
        llama_cpp.llama_sampler_free(grammar)


class TokenSampler(NativeHandle):
    """A sequence's llama.cpp sampler chain (and grammar); freed by `close`, `with`, or garbage collection.

    Example:
        with TokenSampler(model, options, n_ctx) as sampler:
            sampler.accept_prompt(prompt_tokens)
            token = sampler.sample(logits)   # None: the grammar allows no token
            sampler.accept(token)
    """

    def __init__(self, model, options: ChainOptions, n_ctx: int):
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.options = options
        self.last_n = n_ctx if options.repeat_last_n < 0 else options.repeat_last_n
        grammar = None if options.grammar is None else grammar_sampler(model, options.grammar)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain, self._grammar = chain, grammar
        self.own(_free, (chain, grammar))
        for step in self._steps(options):
            llama_cpp.llama_sampler_chain_add(chain, step)
        self._data = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)

    def _steps(self, o: ChainOptions) -> list:
        steps = []
        if o.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(o.logit_bias))(*o.logit_bias)
            steps.append(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(o.logit_bias), biases))
        if self.last_n and (o.repeat_penalty != 1.0 or o.presence_penalty or o.frequency_penalty):
            steps.append(llama_cpp.llama_sampler_init_penalties(
                self.n_vocab, self.last_n, o.repeat_penalty, o.frequency_penalty, o.presence_penalty))
        if o.temperature <= 0.0:
            return steps + [llama_cpp.llama_sampler_init_greedy()]
        seed = RANDOM_SEED if o.seed is None else int(o.seed) & SEED_MASK
        return steps + [llama_cpp.llama_sampler_init_top_k(o.top_k), llama_cpp.llama_sampler_init_top_p(o.top_p, 1),
                        llama_cpp.llama_sampler_init_min_p(o.min_p, 1),
                        llama_cpp.llama_sampler_init_temp(o.temperature), llama_cpp.llama_sampler_init_dist(seed)]

    def accept_prompt(self, tokens) -> None:
        """Feed the prompt's tokens to the penalties (as llama-server does; the grammar never sees them)."""
        self.require_open()
        for token in list(tokens)[-self.last_n:] if self.last_n else []:
            llama_cpp.llama_sampler_accept(self._chain, int(token))

    def accept(self, token: int) -> None:
        """Record a generated token: penalties count it, the grammar advances past it."""
        self.require_open()
        llama_cpp.llama_sampler_accept(self._chain, int(token))
        if self._grammar:
            llama_cpp.llama_sampler_accept(self._grammar, int(token))

    def sample(self, logits: np.ndarray) -> int | None:
        """The next token for these logits (one row, n_vocab floats); None when the grammar allows none."""
        self.require_open()
        if logits.shape != (self.n_vocab,):
            raise ValueError(f"expected {self.n_vocab} logits, got shape {logits.shape}")
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        candidates = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=self.n_vocab,
            selected=-1, sorted=False)
        if self._grammar:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
            if np.isneginf(data["logit"][: candidates.size]).all():
                return None  # a dead end of the grammar
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(candidates))
        if not 0 <= candidates.selected < candidates.size:
            raise RuntimeError(f"llama.cpp's sampler chain selected no token (selected={candidates.selected})")
        return int(candidates.data[candidates.selected].id)
