"""Per-sequence sampling options of the batch (the server's presence/frequency penalties, logit_bias
and logprobs), checked against the float64 numpy forward pass of the tiny reference model."""

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


def penalized(logits: np.ndarray, earlier, presence: float, frequency: float) -> np.ndarray:
    out = logits.copy()
    for token in set(earlier):
        out[token] -= frequency * list(earlier).count(token) + presence
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(0.8, 0.6), (-0.4, -0.3)])
def test_penalties_and_logprobs_match_numpy(tiny_model, tiny_weights, presence, frequency):
    sampling = SequenceSampling(TOKENS, presence_penalty=presence, frequency_penalty=frequency, logprobs=3)
    plain, steered_by_penalty = run(tiny_model, [SequenceSampling(TOKENS), sampling])
    assert plain.tokens != steered_by_penalty.tokens  # the penalties change what is generated
    assert plain.logprobs is None
    result = steered_by_penalty
    logits = reference_logits(tiny_model, tiny_weights, PROMPT, result.tokens)
    assert len(result.logprobs) == len(result.tokens) == result.completion_tokens
    for i, (token, entry) in enumerate(zip(result.tokens, result.logprobs)):
        step = penalized(logits[i], result.tokens[:i], presence, frequency)
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
        (result,) = run(tiny_model, [SequenceSampling(60, temperature=0.9, seed=3, grammar=json_schema_to_gbnf(json.dumps(schema)))], prompt)
        value = json.loads(result.text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


def test_a_grammar_that_does_not_parse_is_refused(tiny_model):
    with ContinuousBatch(tiny_model) as batch, pytest.raises(ValueError, match="does not parse"):
        batch.add(tiny_model.tokenize_prompt("x"), [], SequenceSampling(4, grammar="root ::= ("))
