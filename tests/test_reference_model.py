"""Self-test of the test oracle: llama.cpp must run tests/support/reference_model.py's tiny llama
exactly as the numpy reference does.

Tolerances (default sizes; logits have std ~1 and max |logit| ~4.1-4.4):

* Tight config -- F32 KV cache, no flash attention, compared with kv_f16=False:
  observed max |llama.cpp - reference| = 5.3e-6 for seed 0 (8.3e-6 over seeds 0-2; about
  1e-6 of the largest logit) on prompts of 1..98 tokens.  That is float32 round-off (unit
  round-off 6e-8) accumulated over dot products of length <= 96, three blocks, a residual
  stream of norm ~14 and the lm_head, against a float64 reference.  TIGHT_ATOL = 5e-5 leaves
  about 6-10x headroom.
* llama-cpp-python defaults -- F16 KV cache, flash attention off (llama-cpp-python 0.3.36 maps
  flash_attn=False, its default, to DISABLED rather than llama.cpp's AUTO): the reference with
  kv_f16=True, which also rounds Q and the softmax weights to F16 as ggml's CPU matmul against
  an F16 matrix does, is within 2.2e-3 (seeds 0-2); without that emulation the error reaches
  9.9e-3.  What is left comes from values near an F16 rounding boundary that round one way in
  float32 and the other in float64; it grows with prompt length (~1e-6 up to 8 tokens).  DEFAULT_ATOL = 1e-2.
* flash_attn=True (not tested here): up to 8.5e-3 against kv_f16=True, and identical numbers
  with type_k/type_v = F32, so flash attention cannot be made tight on CPU.

Structural mistakes (NeoX-style RoPE, a transposed projection, wrong GQA head mapping) give
errors of 2..5, so both tolerances separate right from wrong by orders of magnitude.
"""

from __future__ import annotations

import copy
import ctypes

import llama_cpp
import numpy as np
import pytest
from support import reference_model
from support.reference_model import BOS_ID, SPIECE_SPACE, reference_forward

TIGHT_ATOL = 5e-5
DEFAULT_ATOL = 1e-2
# A real model mismatch must miss by far more than any tolerance above.
MISMATCH_MIN_ERROR = 0.5

# Llama kwargs that make llama.cpp agree with the float64 reference to float32 round-off.
TIGHT_LLAMA_KWARGS = dict(
    flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32
)
COMMON_LLAMA_KWARGS = dict(n_ctx=128, logits_all=True, verbose=False, n_threads=2)

PROMPTS = [
    "",  # BOS only
    "a",
    "the happy dog",
    "I am very sad today!",
    "Hello, World. xyz 123 ~{}",  # mostly byte-fallback tokens
    "I feel very happy and you are sad, the dog is good but the cat is bad. " * 4,  # ~100 tokens
]


@pytest.fixture(scope="module")
def tight_llm(tiny_model_path):
    return llama_cpp.Llama(model_path=str(tiny_model_path), **COMMON_LLAMA_KWARGS, **TIGHT_LLAMA_KWARGS)


@pytest.fixture(scope="module")
def default_llm(tiny_model_path):
    return llama_cpp.Llama(model_path=str(tiny_model_path), **COMMON_LLAMA_KWARGS)


@pytest.fixture(scope="module")
def embedding_llm(tiny_model_path):
    # Per-token embeddings (no pooling) are llama.cpp's final hidden state after output_norm.
    return llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=128, embedding=True, verbose=False, n_threads=2,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, **TIGHT_LLAMA_KWARGS,
    )


def llama_logits(llm: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    llm.reset()  # eval() appends to the previous sequence otherwise
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def max_abs_error(llm, weights, tokens, *, kv_f16: bool) -> float:
    _, ref = reference_forward(weights, tokens, kv_f16=kv_f16)
    return float(np.abs(llama_logits(llm, tokens) - ref).max())


def long_tokens(llm) -> list[int]:
    return llm.tokenize(PROMPTS[-1].encode())


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def test_tokenizer_prepends_bos_and_uses_word_pieces(tight_llm, tiny_weights):
    vocab = tiny_weights.vocab
    tokens = tight_llm.tokenize(b"the happy dog")
    expected = [BOS_ID] + [vocab.index(SPIECE_SPACE + w) for w in ("the", "happy", "dog")]
    assert tokens == expected
    assert tight_llm.tokenize(b"the happy dog", add_bos=False) == expected[1:]
    assert tight_llm.tokenize(b"") == [BOS_ID]


def test_tokenizer_falls_back_to_bytes(tight_llm, tiny_weights):
    tokens = tight_llm.tokenize(b"Hi!", add_bos=False)
    pieces = [tiny_weights.vocab[t] for t in tokens]
    assert "<0x48>" in pieces and "<0x21>" in pieces  # "H" and "!" have no word piece
    assert tight_llm.detokenize(tokens) == b" Hi!"  # SPM adds a leading space


def test_vocab_is_small(tiny_weights):
    assert tiny_weights.hparams.n_vocab == len(tiny_weights.vocab) < 400


# ---------------------------------------------------------------------------
# llama.cpp vs reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_reference_tight(tight_llm, tiny_weights, prompt):
    tokens = tight_llm.tokenize(prompt.encode())
    _, ref = reference_forward(tiny_weights, tokens, kv_f16=False)
    np.testing.assert_allclose(llama_logits(tight_llm, tokens), ref, rtol=0, atol=TIGHT_ATOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_reference_default_config(default_llm, tiny_weights, prompt):
    tokens = default_llm.tokenize(prompt.encode())
    _, ref = reference_forward(tiny_weights, tokens, kv_f16=True)
    np.testing.assert_allclose(llama_logits(default_llm, tokens), ref, rtol=0, atol=DEFAULT_ATOL)


def test_final_hidden_state_matches_llama_cpp_embeddings(embedding_llm, tiny_weights):
    prompt = "I am very happy today"
    tokens = embedding_llm.tokenize(prompt.encode())
    got = np.array(embedding_llm.embed(prompt, normalize=False), dtype=np.float64)
    hidden, _ = reference_forward(tiny_weights, tokens, kv_f16=False)
    final_normed = reference_model.rms_norm(hidden[-1], tiny_weights.output_norm, tiny_weights.hparams.eps)
    np.testing.assert_allclose(got, final_normed, rtol=0, atol=TIGHT_ATOL)


def test_model_is_not_degenerate(tight_llm, tiny_weights):
    # Growing residual norms and distinct logits per position make layer/position bugs visible.
    hidden, logits = reference_forward(tiny_weights, long_tokens(tight_llm), kv_f16=False)
    norms = np.linalg.norm(hidden, axis=-1).mean(axis=1)
    assert np.all(np.diff(norms) > 0)
    assert logits.std() > 0.5
    assert np.abs(np.diff(logits, axis=0)).max() > 1.0


# ---------------------------------------------------------------------------
# The comparison can fail: deliberately wrong references must be rejected
# ---------------------------------------------------------------------------

def neox_rope(x, positions, theta_base):
    """The wrong convention for LLAMA: rotates (x[i], x[i + d/2]) instead of adjacent pairs."""
    half = x.shape[-1] // 2
    inv_freq = theta_base ** (-np.arange(0, x.shape[-1], 2) / x.shape[-1])
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def with_transposed_wq(weights):
    wrong = copy.deepcopy(weights)
    for layer in wrong.layers:
        layer.wq = layer.wq.T.copy()  # square for the default sizes, so only the values are wrong
    return wrong


def tiled_kv_heads(x, group):
    """Wrong GQA mapping: query head h reads kv head h % n_head_kv instead of h // group."""
    return np.tile(x, (1, group, 1))


def test_wrong_rope_convention_is_detected(tight_llm, tiny_weights, monkeypatch):
    monkeypatch.setattr(reference_model, "apply_rope", neox_rope)
    err = max_abs_error(tight_llm, tiny_weights, long_tokens(tight_llm), kv_f16=False)
    assert err > MISMATCH_MIN_ERROR


def test_transposed_projection_is_detected(tight_llm, tiny_weights):
    err = max_abs_error(tight_llm, with_transposed_wq(tiny_weights), long_tokens(tight_llm), kv_f16=False)
    assert err > MISMATCH_MIN_ERROR


def test_wrong_gqa_head_mapping_is_detected(tight_llm, tiny_weights, monkeypatch):
    monkeypatch.setattr(reference_model, "expand_kv_heads", tiled_kv_heads)
    err = max_abs_error(tight_llm, tiny_weights, long_tokens(tight_llm), kv_f16=False)
    assert err > MISMATCH_MIN_ERROR


# ---------------------------------------------------------------------------
# block_output_hook
# ---------------------------------------------------------------------------

def adder_at_layer(layer: int, vector: np.ndarray):
    return lambda il, h: h + vector if il == layer else h


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hook_steers_only_from_its_layer_on(tiny_weights, layer):
    tokens = [BOS_ID, 300, 310, 320, 330]
    vector = np.random.default_rng(1).standard_normal(tiny_weights.hparams.n_embd) * 3
    hidden, logits = reference_forward(tiny_weights, tokens)
    steered_hidden, steered_logits = reference_forward(
        tiny_weights, tokens, block_output_hook=adder_at_layer(layer, vector)
    )
    np.testing.assert_array_equal(steered_hidden[:layer], hidden[:layer])
    np.testing.assert_allclose(steered_hidden[layer] - hidden[layer], np.broadcast_to(vector, hidden[layer].shape))
    assert np.abs(steered_logits - logits).max() > MISMATCH_MIN_ERROR


def test_identity_hook_changes_nothing(tiny_weights):
    tokens = [BOS_ID, 300, 310]
    plain = reference_forward(tiny_weights, tokens)
    hooked = reference_forward(tiny_weights, tokens, block_output_hook=lambda _il, h: h)
    for a, b in zip(plain, hooked):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layer", [1, 2])
def test_hook_matches_llama_cpp_control_vector(tight_llm, tiny_weights, layer):
    # llama.cpp's cvec buffer starts at layer 1 (block 0's output cannot be steered there);
    # its layer il adds to the output of block il, i.e. the hook's il.
    hp = tiny_weights.hparams
    vector = np.random.default_rng(2).standard_normal(hp.n_embd) * 3
    buffer = np.zeros((hp.n_layer, hp.n_embd), dtype=np.float32)
    buffer[layer - 1] = vector
    tokens = tight_llm.tokenize(b"I am very happy today")
    rc = llama_cpp.llama_set_adapter_cvec(
        tight_llm.ctx, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buffer.size, hp.n_embd, layer, layer
    )
    assert rc == 0
    try:
        got = llama_logits(tight_llm, tokens)
    finally:
        llama_cpp.llama_set_adapter_cvec(tight_llm.ctx, None, 0, hp.n_embd, 0, 0)  # clear for other tests
    _, ref = reference_forward(tiny_weights, tokens, kv_f16=False, block_output_hook=adder_at_layer(layer, vector))
    np.testing.assert_allclose(got, ref, rtol=0, atol=TIGHT_ATOL)
