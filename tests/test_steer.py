"""Steering through llama.cpp's control-vector adapter, checked against the numpy reference."""

import ctypes

import llama_cpp
import numpy as np
import pytest
from support.oracle import ATOL, PROMPT, last_logits, random_vector
from support.reference_model import reference_forward

from ggsteer.vectors import ControlVector, parse_layer_range

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

def reference_logits(model, weights, added: dict[int, np.ndarray], prompt=PROMPT):
    def hook(il, h):
        return h + added[il] if il in added else h

    _, logits = reference_forward(weights, model.tokenize_prompt(prompt), kv_f16=False, block_output_hook=hook)
    return logits[-1]


def test_steered_logits_match_reference(tiny_model, tiny_weights):
    vector = random_vector(tiny_model, 0)
    tiny_model.set_control(vector, 0.7, layers=[1, 2])
    expected = reference_logits(tiny_model, tiny_weights, {il: 0.7 * vector.directions[il] for il in (1, 2)})
    np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)


def test_layer_range_steers_only_those_layers(tiny_model, tiny_weights):
    vector = random_vector(tiny_model, 1)
    tiny_model.set_control(vector, -1.2, layers=[2])
    expected = reference_logits(tiny_model, tiny_weights, {2: -1.2 * vector.directions[2]})
    np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)
    everywhere = reference_logits(tiny_model, tiny_weights, {il: -1.2 * vector.directions[il] for il in (1, 2)})
    assert np.abs(last_logits(tiny_model) - everywhere).max() > 100 * ATOL


def test_two_vectors_are_summed(tiny_model, tiny_weights):
    a, b = random_vector(tiny_model, 2), random_vector(tiny_model, 3)
    tiny_model.set_control([(a, 0.5), (b, -0.3)], layers=[1, 2])
    expected = reference_logits(tiny_model, tiny_weights,
                                {il: 0.5 * a.directions[il] - 0.3 * b.directions[il] for il in (1, 2)})
    np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)
    summed = last_logits(tiny_model)
    tiny_model.set_control(0.5 * a - 0.3 * b, 1.0, layers=[1, 2])
    np.testing.assert_allclose(last_logits(tiny_model), summed, atol=1e-6, rtol=0)


def test_reset_restores_unsteered_logits_exactly(tiny_model):
    plain = last_logits(tiny_model)
    tiny_model.set_control(random_vector(tiny_model, 4), 2.0, layers=[1, 2])
    assert np.abs(last_logits(tiny_model) - plain).max() > 1e-2
    tiny_model.reset_control()
    np.testing.assert_array_equal(last_logits(tiny_model), plain)


def test_steer_context_restores_previous_control(tiny_model):
    a, b = random_vector(tiny_model, 5), random_vector(tiny_model, 6)
    tiny_model.set_control(a, 0.4, layers=[1, 2])
    with_a = last_logits(tiny_model)
    with tiny_model.steer(b, 1.0, layers=[1, 2]):
        assert np.abs(last_logits(tiny_model) - with_a).max() > 1e-2
    np.testing.assert_array_equal(last_logits(tiny_model), with_a)


def test_cached_prefix_not_reused_across_controls(tiny_model, tiny_weights):
    vector = random_vector(tiny_model, 7)
    # fill the KV cache with the prompt, unsteered
    tiny_model.create_completion(PROMPT, max_tokens=2, temperature=0)
    tiny_model.set_control(vector, 1.0, layers=[1, 2])
    # Llama.generate would reuse a matching prefix; steering must have invalidated it
    next(tiny_model.generate(tiny_model.tokenize_prompt(PROMPT), temp=0))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(tiny_model.ctx, -1), shape=(tiny_model.n_vocab(),))
    expected = reference_logits(tiny_model, tiny_weights, {il: vector.directions[il] for il in (1, 2)})
    np.testing.assert_allclose(logits, expected, atol=ATOL, rtol=0)


def test_completion_api_is_steered(tiny_model):
    plain = tiny_model.create_completion(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    with tiny_model.steer(random_vector(tiny_model, 8, scale=20.0), 1.0, layers=[1, 2]):
        steered = tiny_model.create_completion(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
        streamed = "".join(c["choices"][0]["text"]
                           for c in tiny_model(PROMPT, max_tokens=8, temperature=0, stream=True))
    assert steered != plain
    assert streamed == steered


# -- bad input ------------------------------------------------------------------------------


def test_vector_for_another_model(tiny_model):
    other = ControlVector({1: np.ones(7, np.float32)}, "llama", {"unit": "gap"})
    with pytest.raises(ValueError, match="n_embd 7 but the model has n_embd 48"):
        tiny_model.set_control(other, 1.0)


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_non_finite_strength(tiny_model, strength):
    with pytest.raises(ValueError, match="strength must be a finite number"):
        tiny_model.set_control(random_vector(tiny_model, 0), strength)


def test_layers_beyond_model(tiny_model):
    with pytest.raises(ValueError, match="layer 5 is beyond the model: it has layers 0..2"):
        tiny_model.set_control(random_vector(tiny_model, 0), 1.0, layers=[1, 5])


def test_layer_zero_goes_through_the_hook(tiny_model, tiny_weights):
    # llama.cpp's adapter cannot reach block 0; ggsteer's hook can
    vector = random_vector(tiny_model, 0, layers=(0, 1))
    tiny_model.set_control(vector, 0.9, layers=[0, 1])
    expected = reference_logits(tiny_model, tiny_weights, {il: 0.9 * vector.directions[il] for il in (0, 1)})
    np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)


def test_raw_vector_needs_raw_mode(tiny_model, tiny_weights):
    raw = ControlVector({1: np.ones(48, np.float32), 2: np.ones(48, np.float32)}, "llama")
    with pytest.raises(ValueError, match="no per-layer gap.*raw=True"):
        tiny_model.set_control(raw, 1.0)
    tiny_model.set_control(raw, 0.25, raw=True, layers=[1, 2])
    expected = reference_logits(tiny_model, tiny_weights, {1: np.full(48, 0.25), 2: np.full(48, 0.25)})
    np.testing.assert_allclose(last_logits(tiny_model), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("text, layers", [("3-5", [3, 4, 5]), ("7", [7]), ("1,3,5-6", [1, 3, 5, 6])])
def test_parse_layer_range(text, layers):
    assert parse_layer_range(text) == layers


@pytest.mark.parametrize("text", ["", "a-b", "5-3", "1-", "-2"])
def test_parse_layer_range_rejects(text):
    with pytest.raises(ValueError, match="layer range"):
        parse_layer_range(text)


_ = ctypes


def test_continuation_logprobs_match_reference(tiny_model, tiny_weights):
    from ggsteer.evaluate import continuation_logprobs

    items = [("i am very", " happy and good"), ("the dog", " is sad"), ("a cat and the", " dog")]
    vector = random_vector(tiny_model, 9)
    tiny_model.set_control(vector, 0.8, layers=[1, 2])
    got = continuation_logprobs(tiny_model, items)
    for (prompt, continuation), value in zip(items, got):
        n_prompt = len(tiny_model.tokenize_prompt(prompt))
        tokens = tiny_model.tokenize_prompt(prompt + continuation)
        _, logits = reference_forward(
            tiny_weights, tokens, kv_f16=False,
            block_output_hook=lambda il, h: h + 0.8 * vector.directions[il] if il in (1, 2) else h
        )
        logp = logits - logits.max(axis=1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
        expected = sum(logp[pos - 1, tokens[pos]] for pos in range(n_prompt, len(tokens)))
        assert value == pytest.approx(expected, abs=1e-4)
