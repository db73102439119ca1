"""Oracles on the tiny reference model shared by the steering, intervention and training tests."""

import llama_cpp
import numpy as np

from ggsteer.vectors import ControlVector
from support.reference_model import reference_forward

# logits are O(1); float32 round-off through 3 blocks stays near 1e-5 (test_reference_model.py)
ATOL = 5e-5
PROMPT = "i am very happy and the dog"


def last_logits(model, prompt=PROMPT):
    model.reset()
    model.eval(model.tokenize_prompt(prompt))
    pointer = llama_cpp.llama_get_logits_ith(model.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(model.n_vocab(),)).copy()


def random_vector(model, seed, layers=(1, 2), scale=1.5):
    rng = np.random.default_rng(seed)
    directions = {il: rng.normal(size=model.n_embd).astype(np.float32) * scale for il in layers}
    return ControlVector(directions, "llama", {"unit": "gap"})


def numpy_op(kind, h, v, c):
    h = h.astype(np.float64)
    v = v.astype(np.float64)
    if kind == "add":
        return h + c * v
    if kind == "ablate":
        return h - (h * v).sum(1, keepdims=True) * v
    if kind == "clamp":
        return h + (c - (h * v).sum(1, keepdims=True)) * v
    out = h + c * v
    return out * (np.linalg.norm(h, axis=1, keepdims=True) / np.linalg.norm(out, axis=1, keepdims=True))


def reference_with(model, weights, tokens, edit_rows):
    """Reference logits with `edit_rows(il, h, positions) -> h` applied to each block output."""
    positions = np.arange(len(tokens))
    _, logits = reference_forward(weights, tokens, kv_f16=False,
                                  block_output_hook=lambda il, h: edit_rows(il, h, positions))
    return logits


def unit(v):
    return v / np.linalg.norm(v)


SUFFIXES = ["i feel", "the dog is", "you am very", "today i", "a cat and the dog", "i love the", "the", "good"]




def reference_last_states(model, weights, prompts):
    states = []
    for prompt in prompts:
        hidden, _ = reference_forward(weights, model.tokenize_prompt(prompt), kv_f16=False)
        states.append(hidden[:, -1])
    return np.stack(states)  # [n_prompts, n_layer, n_embd]
