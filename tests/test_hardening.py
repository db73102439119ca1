"""Failure paths of the model layer: native buffers never overrun, a failed decode leaves no
states behind for a later call to reuse, and a condition decides on the whole prompt. (Errors left
by decodes ggsteer did not run are cleared by the hook itself: tests/test_hook_state.py.)"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from support.models import TIGHT_LLAMA_KWARGS

from ggsteer import SteeredModel
from ggsteer.runtime.batch import BatchFullError, OwnedBatch
from ggsteer.runtime.hooked_context import HookError
from ggsteer.vectors import ControlVector

PROMPTS = ["the cat", "a dog sat", "you are", "today I", "good bad", "feel to"]


def test_owned_batch_refuses_a_row_past_its_capacity():
    batch = OwnedBatch(2)
    try:
        assert [batch.add(5, 0, 0, False), batch.add(6, 1, 0, True)] == [0, 1]
        with pytest.raises(BatchFullError, match="holds 2 rows"):
            batch.add(7, 2, 0, True)
        assert batch.n_rows == 2 and batch.batch.n_tokens == 2
    finally:
        batch.close()


def test_more_ready_sequences_than_batch_rows_are_deferred_not_written_past_the_batch(tiny_model_path):
    """40 sequences with n_batch=16 (llama.cpp aborted the process before the fix); each text equals
    the sequence decoded alone (the tiny F32 model is batch-invariant)."""
    model = SteeredModel(tiny_model_path, n_ctx=1024, n_batch=16, n_seq_max=64, **TIGHT_LLAMA_KWARGS)
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(40)]
        together = model.generate_batch(prompts, max_tokens=4)
        alone = [model.generate_batch([p], max_tokens=4)[0] for p in prompts]
    finally:
        model.close()
    assert len(together) == 40
    # every one of the 40, not the first 8: a row deferred to the wrong sequence would show here
    assert together == alone
    assert len(set(alone)) > 1  # the prompts differ, so a mix-up would not go unnoticed


def last_logits(model) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),)).copy()


class _MisreportingHook:
    """Delegates to the real hook but describes one row too many, so the callback refuses the decode."""

    def __init__(self, hook):
        self._real = hook

    def set_rows(self, slots, positions, generated, outputs):  # noqa: ARG002 - the hook's signature
        extra = np.append(positions, positions[-1] + 1).astype(np.int32)
        self._real.set_rows(np.zeros(len(extra), np.int32), extra, np.zeros(len(extra), np.uint8),
                            np.array([0, 1], np.int32))

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_refused_decode_leaves_no_cached_states(tiny_model_path):
    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=8, **TIGHT_LLAMA_KWARGS)
    try:
        vector = ControlVector({1: np.ones(model.n_embd, np.float32)}, "llama", {"unit": "raw"})
        model.set_control(vector, 0.5, raw=True, when="generated")  # a hook intervention: eval describes rows
        tokens = model.tokenize_prompt("the cat sat on a dog today")
        model.eval(tokens[:3])
        real = model.hook
        model.hook = _MisreportingHook(real)
        with pytest.raises(HookError, match="rows but the batch has"):
            model.eval(tokens[3:])
        model.hook = real
        memory = llama_cpp.llama_get_memory(model.ctx)
        assert model.n_tokens == 3
        assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == 2  # nothing cached past the good prefix
        model.eval(tokens[3:])
        resumed = last_logits(model)
        model.reset()
        model.eval(tokens)
        fresh = last_logits(model)
    finally:
        model.close()
    np.testing.assert_array_equal(resumed, fresh)


def test_a_conditioned_prompt_is_decided_on_the_whole_prompt_whatever_the_traffic(tiny_model_path):
    """A CAST condition whose answer differs between the prompt's first tokens and the whole prompt:
    next to an older prompt that takes most of a decode, the conditioned prompt used to be split and
    its first rows steered on the partial decision. It now waits and is decoded in one go, so its
    text equals the prompt served alone."""
    model = SteeredModel(tiny_model_path, n_ctx=512, n_batch=12, n_seq_max=8, **TIGHT_LLAMA_KWARGS)
    try:
        prompt, other = "the cat sat on a dog today good bad", "you are good to feel today"
        n_prompt, n_other = len(model.tokenize_prompt(prompt)), len(model.tokenize_prompt(other))
        assert n_other < 12 < n_other + n_prompt and n_prompt <= 12
        rows = model.hidden_states([prompt], layers=[0], pool="all")[0][:, 0].astype(np.float64)
        head = rows[: 12 - n_other].mean(axis=0)  # what the split first decode would have seen
        whole = rows.mean(axis=0)
        direction = head / np.linalg.norm(head) - whole / np.linalg.norm(whole)
        assert head @ direction > 0 > whole @ direction  # threshold 0 splits the two decisions
        condition = ControlVector({0: direction.astype(np.float32)}, "llama", {"unit": "raw"})
        push = ControlVector({1: np.full(model.n_embd, 3.0, np.float32)}, "llama", {"unit": "raw"})
        steer = model.intervention(push, 1.0, raw=True, condition=(condition, 0.0, 0))
        alone = model.generate_batch([prompt], [[steer]], max_tokens=5)[0]
        unsteered = model.generate_batch([prompt], max_tokens=5)[0]
        beside = model.generate_batch([other, prompt], [None, [steer]], max_tokens=5)[1]
        with pytest.raises(ValueError, match="decoded in one go"):
            model.generate_batch([prompt + " the cat sat on a dog"], [[steer]], max_tokens=2)
    finally:
        model.close()
    assert alone == unsteered  # the whole prompt does not meet the condition
    assert beside == alone
