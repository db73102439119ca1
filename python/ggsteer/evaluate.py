"""Measure steering: log-probabilities of continuations under the current controls.

The behaviour score of a prompt is log P(positive continuation) - log P(negative continuation)
(CAA-style); steering toward the positive side should raise it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import llama_cpp
import numpy as np

if TYPE_CHECKING:
    from ggsteer.model import SteeredModel


def _pair_tokens(model: "SteeredModel", prompt: str, continuation: str) -> tuple[list[int], int]:
    """Tokens of prompt + continuation and how many belong to the prompt."""
    prompt_tokens = model.tokenize_prompt(prompt)
    full = model.tokenize_prompt(prompt + continuation)
    if full[: len(prompt_tokens)] != prompt_tokens:
        # the join merged across the boundary: score the continuation's own tokens instead
        full = prompt_tokens + model.tokenize(continuation.encode("utf-8"), add_bos=False, special=True)
    if len(full) == len(prompt_tokens):
        raise ValueError(f"continuation {continuation!r} has no tokens")
    return full, len(prompt_tokens)


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    top = logits.max()
    return float(logits[token] - top - np.log(np.exp(logits - top).sum()))


def continuation_logprobs(model: "SteeredModel", items: Sequence[tuple[str, str]]) -> np.ndarray:
    """Sum of log P(continuation token | everything before) for each (prompt, continuation)."""
    encoded = [_pair_tokens(model, p, c) for p, c in items]
    scores = np.zeros(len(items))
    memory = llama_cpp.llama_get_memory(model.ctx)
    batch = llama_cpp.llama_batch_init(model.n_batch, 0, 1)
    n_vocab = model.n_vocab()
    model.reset()
    try:
        start = 0
        while start < len(encoded):
            stop = _fill_batch(batch, encoded, start, model.n_batch, model.n_seq_max)
            llama_cpp.llama_memory_clear(memory, True)
            if llama_cpp.llama_decode(model.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while scoring continuations")
            row = 0
            for index in range(start, stop):
                tokens, n_prompt = encoded[index]
                row += n_prompt - 1
                for token in tokens[n_prompt:]:
                    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, row), shape=(n_vocab,))
                    scores[index] += _log_softmax_at(logits, token)
                    row += 1
                row += 1  # the last token predicts nothing we score
            start = stop
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_clear(memory, True)
        model.reset()
    return scores


def _fill_batch(batch, encoded, start: int, n_batch: int, n_seq_max: int) -> int:
    """Pack sequences from `start` on; logits only where a continuation token is predicted."""
    n_tokens, index = 0, start
    while index < len(encoded) and index - start < n_seq_max:
        tokens, n_prompt = encoded[index]
        if len(tokens) > n_batch:
            raise ValueError(f"prompt and continuation {index} have {len(tokens)} tokens, more than n_batch={n_batch}")
        if n_tokens + len(tokens) > n_batch:
            break
        for pos, token in enumerate(tokens):
            batch.token[n_tokens] = token
            batch.pos[n_tokens] = pos
            batch.n_seq_id[n_tokens] = 1
            batch.seq_id[n_tokens][0] = index - start
            batch.logits[n_tokens] = n_prompt - 1 <= pos < len(tokens) - 1
            n_tokens += 1
        index += 1
    batch.n_tokens = n_tokens
    return index


def behaviour_scores(model: "SteeredModel", eval_items: Sequence[dict]) -> np.ndarray:
    """log P(positive) - log P(negative) per prompt, under the model's current controls."""
    pairs = [(item["prompt"], item["positive"]) for item in eval_items] + [(item["prompt"], item["negative"]) for item in eval_items]
    logprobs = continuation_logprobs(model, pairs)
    n = len(eval_items)
    return logprobs[:n] - logprobs[n:]
