"""ContinuousBatch decodes each new token once (issue 12): the text, the streamed pieces and the stop
cut must equal decoding the whole generation on every token, as it was done before (quadratic).

The tiny model's vocabulary has all 256 byte tokens, so multi-byte UTF-8 characters can be split
across tokens at every byte, and invalid bytes can be produced too.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggsteer import SequenceSampling
from ggsteer.generation import ContinuousBatch, SequenceState

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")


def whole_generation_text(model, generated: list[int], stops) -> tuple[str, bool]:
    """The previous implementation: decode everything, cut at each stop string in turn."""
    text = model.detokenize(generated).decode("utf-8", errors="ignore")
    stopped = False
    for word in stops:
        cut = text.find(word)
        if cut >= 0:
            text, stopped = text[:cut], True
    return text, stopped


def byte_tokens(model) -> dict[int, int]:
    """byte value -> token id of the tiny vocabulary's single-byte tokens."""
    table = {}
    for token in range(model.n_vocab()):
        piece = model.detokenize([token])
        if len(piece) == 1 and piece[0] not in table:
            table[piece[0]] = token
    assert len(table) == 256
    return table


def feed(batch, model, tokens: list[int], stops=()) -> tuple[SequenceState, list[str]]:
    """Feed tokens one at a time as _next_token does; check the text against the old way after each."""
    pieces = []
    state = SequenceState(0, 0, [model.token_bos()], SequenceSampling(10_000, stop=tuple(stops)), [],
                          on_piece=pieces.append)
    old_text = ""
    for token in tokens:
        state.generated.append(token)
        batch._update_text(state)
        expected, stopped = whole_generation_text(model, state.generated, stops)
        assert state.text == expected, state.generated
        assert (state.finish_reason == "stop") == stopped
        if len(expected) > len(old_text):
            assert pieces and pieces[-1] == expected[len(old_text):]
        old_text = expected
        if stopped:
            break
    return state, pieces


@pytest.fixture
def batch(tiny_model):
    with ContinuousBatch(tiny_model) as batch:
        yield batch


def test_multibyte_characters_split_across_tokens(batch, tiny_model):
    table = byte_tokens(tiny_model)
    text = "héllo → 日本語 🙂 naïve"
    tokens = [table[b] for b in text.encode("utf-8")]
    state, pieces = feed(batch, tiny_model, tokens)
    assert state.text == text
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_stop_string_of_multibyte_characters(batch, tiny_model):
    table = byte_tokens(tiny_model)
    text = "one 日本 two"
    state, _ = feed(batch, tiny_model, [table[b] for b in text.encode()], stops=["本 t", "xyz"])
    assert (state.text, state.finish_reason) == ("one 日", "stop")


@pytest.mark.parametrize("seed", range(6))
def test_random_generations_equal_the_whole_decode(batch, tiny_model, seed):
    """Random tokens: words, single bytes (invalid UTF-8 included), multi-byte characters, BOS first."""
    rng = np.random.default_rng(seed)
    table = byte_tokens(tiny_model)
    multibyte = [table[b] for b in "é日🙂ß".encode()]
    tokens = [tiny_model.token_bos()] if seed % 2 else []
    for _ in range(300):
        kind = rng.integers(3)
        if kind == 0:
            tokens.append(int(rng.integers(tiny_model.n_vocab())))
        elif kind == 1:
            tokens.append(table[int(rng.integers(256))])
        else:
            start = int(rng.integers(len(multibyte)))
            tokens += multibyte[start : start + int(rng.integers(1, 5))]
    stops = [] if seed < 2 else [tiny_model.detokenize(tokens[150:153]).decode("utf-8", "ignore") or "zzz", "\n\n"]
    feed(batch, tiny_model, tokens, stops)


def test_each_token_is_detokenized_once(tiny_model, monkeypatch):
    calls = []
    detokenize = type(tiny_model).detokenize
    monkeypatch.setattr(tiny_model, "detokenize",
                        lambda tokens, *a, **k: calls.append(len(tokens)) or detokenize(tiny_model, tokens, *a, **k),
                        raising=False)
    result = tiny_model.generate_batch(["the cat"], max_tokens=64, temperature=0.0, details=True)[0]
    assert result.completion_tokens > 32
    assert sum(calls) == result.completion_tokens  # was 1 + 2 + ... + n


def test_a_generation_that_starts_with_bos_loses_the_first_space_as_before(batch, tiny_model):
    # llama-cpp-python drops the leading space of an output whose first token is BOS
    tokens = [tiny_model.token_bos(), *tiny_model.tokenize(b" the the", add_bos=False, special=False)]
    assert tiny_model.detokenize(tokens[1:]).startswith(b" ")
    state, _ = feed(batch, tiny_model, tokens)  # equal to the whole decode after every token
    assert state.text == tiny_model.detokenize(tokens).decode() == tiny_model.detokenize(tokens[1:])[1:].decode()
