"""Oracles on the tiny reference model shared by the steering, intervention and training tests."""

import os
from itertools import takewhile

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




def suffix_counts(model, pairs):
    """How many last tokens of each pair "suffix" pooling reads: the ending both prompts share, less
    the opening every pair's ending shares (with two pairs or more), at least one."""
    endings = []
    for entry in pairs:
        a, b = model.tokenize_prompt(entry.positive), model.tokenize_prompt(entry.negative)
        common = sum(1 for _ in takewhile(lambda t: t[0] == t[1], zip(reversed(a), reversed(b))))
        endings.append(a[len(a) - common:])
    opening = len(os.path.commonprefix(endings)) if len(endings) > 1 else 0
    return [max(len(ending) - opening, 1) for ending in endings]


def reference_pair_states(model, weights, pairs, pool="suffix"):
    """Each pair's (positive, negative) states [n_pairs, n_layer, n_embd] as training pools them: the
    last token, or for "suffix" the mean over the last `suffix_counts` tokens."""
    counts = suffix_counts(model, pairs) if pool == "suffix" else [1] * len(pairs)
    pos, neg = [], []
    for entry, k in zip(pairs, counts):
        for text, side in ((entry.positive, pos), (entry.negative, neg)):
            side.append(reference_forward(weights, model.tokenize_prompt(text), kv_f16=False)[0][:, -k:].mean(axis=1))
    return np.stack(pos), np.stack(neg)


def reference_last_states(model, weights, prompts):
    states = []
    for prompt in prompts:
        hidden, _ = reference_forward(weights, model.tokenize_prompt(prompt), kv_f16=False)
        states.append(hidden[:, -1])
    return np.stack(states)  # [n_prompts, n_layer, n_embd]
