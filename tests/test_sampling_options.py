"""Per-sequence sampling through llama.cpp's sampler chain (penalties, logit_bias, top-k, seeds,
grammar) and the logprobs reported back, checked against the float64 numpy forward pass of the tiny
reference model where a value can be computed, and against the chain's defining properties elsewhere."""

import numpy as np
import pytest
from support.reference_model import reference_forward

from ggsteer.generation import ContinuousBatch, SequenceSampling

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

PROMPT = "the cat sat on the"
TOKENS = 40  # long enough for greedy decoding on the random model to repeat tokens


def run(model, samplings: list[SequenceSampling], prompt: str = PROMPT):
    """Every sampling as its own sequence of one batch, side by side; their results."""
    with ContinuousBatch(model) as batch:
        states = [batch.add(model.tokenize_prompt(prompt), [], sampling) for sampling in samplings]
        while batch.active:
            batch.step()
    return [state.result() for state in states]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def reference_logits(model, weights, prompt: str, generated) -> np.ndarray:
    """The numpy model's logits after the prompt and after each generated token (one row per token)."""
    prompt_tokens = model.tokenize_prompt(prompt)
    _, logits = reference_forward(weights, prompt_tokens + list(generated), kv_f16=False)
    return logits[len(prompt_tokens) - 1: len(prompt_tokens) - 1 + len(generated)]


def penalized(logits: np.ndarray, window, presence: float, frequency: float, repeat: float = 1.0) -> np.ndarray:
    """llama.cpp's penalties over the tokens in `window`: repeat scales the logit toward lower, then
    frequency * count + presence is subtracted."""
    out = logits.copy()
    for token in set(window):
        out[token] = out[token] * repeat if out[token] <= 0 else out[token] / repeat
        out[token] -= frequency * list(window).count(token) + presence
    return out


@pytest.mark.parametrize(("presence", "frequency", "repeat"), [(0.8, 0.6, 1.0), (-0.4, -0.3, 1.0), (0.0, 0.0, 1.5)])
def test_penalties_and_logprobs_match_numpy(tiny_model, tiny_weights, presence, frequency, repeat):
    """As in llama.cpp (and llama-server), the penalties look back over the last repeat_last_n tokens,
    the prompt's included."""
    last_n = 16
    sampling = SequenceSampling(TOKENS, presence_penalty=presence, frequency_penalty=frequency, logprobs=3,
                                repeat_penalty=repeat, repeat_last_n=last_n)
    plain, steered_by_penalty = run(tiny_model, [SequenceSampling(TOKENS), sampling])
    assert plain.tokens != steered_by_penalty.tokens  # the penalties change what is generated
    assert plain.logprobs is None
    result = steered_by_penalty
    logits = reference_logits(tiny_model, tiny_weights, PROMPT, result.tokens)
    history = tiny_model.tokenize_prompt(PROMPT) + list(result.tokens)
    n_prompt = len(history) - len(result.tokens)
    assert len(result.logprobs) == len(result.tokens) == result.completion_tokens
    for i, (token, entry) in enumerate(zip(result.tokens, result.logprobs)):
        step = penalized(logits[i], history[max(0, n_prompt + i - last_n): n_prompt + i], presence, frequency, repeat)
        assert token == int(np.argmax(step)), f"step {i}"
        expected = log_softmax(logits[i])  # logprobs are the model's, before penalties
        assert entry.token == token
        assert entry.logprob == pytest.approx(expected[token], abs=2e-4)
        assert [t for t, _ in entry.top] == list(np.argsort(-expected, kind="stable")[:3])
        assert [lp for _, lp in entry.top] == pytest.approx(np.sort(expected)[::-1][:3], abs=2e-4)


def test_unpenalized_greedy_run_matches_numpy_too(tiny_model, tiny_weights):
    # the oracle itself: without penalties, every token is the numpy argmax
    (result,) = run(tiny_model, [SequenceSampling(TOKENS, logprobs=0)])
    logits = reference_logits(tiny_model, tiny_weights, PROMPT, result.tokens)
    assert list(result.tokens) == [int(np.argmax(row)) for row in logits]
    assert all(entry.top == () for entry in result.logprobs)
    # greedy on a random model repeats itself: the penalty test above exercises real counts
    assert len(set(result.tokens)) < len(result.tokens)


def test_logit_bias_forces_a_token_for_that_sequence_only(tiny_model):
    forced = tiny_model.tokenize_prompt("dog")[-1]
    biased, plain = run(tiny_model, [SequenceSampling(6, logit_bias=((forced, 100.0),)), SequenceSampling(6)])
    (alone,) = run(tiny_model, [SequenceSampling(6)])
    assert biased.tokens == (forced,) * 6
    assert plain.tokens == alone.tokens != biased.tokens


def test_a_logit_bias_of_minus_infinity_bans_a_token(tiny_model):
    (plain,) = run(tiny_model, [SequenceSampling(TOKENS)])
    banned = max(set(plain.tokens), key=plain.tokens.count)  # greedy repeats it: a ban must change the text
    bans = ((banned, float("-inf")),)
    greedy, sampled = run(tiny_model, [SequenceSampling(TOKENS, logit_bias=bans),
                                       SequenceSampling(TOKENS, temperature=1.5, seed=4, logit_bias=bans)])
    assert banned in plain.tokens
    assert banned not in greedy.tokens and banned not in sampled.tokens
    assert greedy.tokens != plain.tokens


def test_top_k_of_one_is_greedy_at_any_temperature(tiny_model):
    greedy, top1_hot, top1_other_seed, hot = run(tiny_model, [
        SequenceSampling(TOKENS), SequenceSampling(TOKENS, temperature=1.8, top_k=1, seed=1),
        SequenceSampling(TOKENS, temperature=1.8, top_k=1, seed=2), SequenceSampling(TOKENS, temperature=1.8, seed=1)])
    assert top1_hot.tokens == top1_other_seed.tokens == greedy.tokens
    assert hot.tokens != greedy.tokens  # positive control: the same temperature without top_k=1 samples


def test_a_seed_fixes_the_text_and_another_seed_changes_it(tiny_model):
    hot = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    a, b, c = run(tiny_model, [SequenceSampling(TOKENS, seed=11, **hot), SequenceSampling(TOKENS, seed=11, **hot),
                               SequenceSampling(TOKENS, seed=12, **hot)])
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    (again,) = run(tiny_model, [SequenceSampling(TOKENS, seed=11, **hot)])  # alone, in a later batch
    assert again.tokens == a.tokens


def test_the_defaults_are_llama_cpps_and_the_library_starts_from_them():
    from ggsteer.sampling import DEFAULTS

    assert (DEFAULTS.temperature, DEFAULTS.top_k, DEFAULTS.top_p, DEFAULTS.min_p) == (0.8, 40, 0.95, 0.05)
    assert (DEFAULTS.repeat_penalty, DEFAULTS.repeat_last_n) == (1.0, 64)
    sampling = SequenceSampling.with_defaults(5, seed=3)
    chosen = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p, sampling.seed)
    assert chosen == (0.8, 40, 0.95, 0.05, 3)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.1, "temperature must be >= 0"), ("top_p", 0.0, "top_p must be in"),
    ("min_p", 1.5, "min_p must be in"), ("repeat_penalty", 0.0, "repeat_penalty must be > 0"),
    ("top_k", 2.5, "top_k must be an integer"), ("repeat_last_n", -2, "repeat_last_n must be an integer >= -1"),
    ("presence_penalty", float("nan"), "presence_penalty must be finite")])
def test_bad_settings_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        SequenceSampling(4, **{field: value})


def test_a_grammar_constrains_the_sequence_that_has_it(tiny_model):
    words = ("yes", "no", "maybe")
    grammar = "root ::= " + " | ".join(f'"{w}"' for w in words)
    free, constrained = run(tiny_model, [SequenceSampling(12), SequenceSampling(12, grammar=grammar)], "i am happy")
    assert constrained.text in words and constrained.finish_reason == "stop"  # ended by the grammar
    assert free.text not in words and free.text == run(tiny_model, [SequenceSampling(12)], "i am happy")[0].text


def test_a_json_schema_grammar_gives_valid_json(tiny_model):
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    for prompt in ("the cat", "hello", "you are"):
        grammar = json_schema_to_gbnf(json.dumps(schema))
        (result,) = run(tiny_model, [SequenceSampling(60, temperature=0.9, seed=3, grammar=grammar)], prompt)
        value = json.loads(result.text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


def test_a_grammar_that_does_not_parse_is_refused(tiny_model):
    with ContinuousBatch(tiny_model) as batch, pytest.raises(ValueError, match="does not parse"):
        batch.add(tiny_model.tokenize_prompt("x"), [], SequenceSampling(4, grammar="root ::= ("))
