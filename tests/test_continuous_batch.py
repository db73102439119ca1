"""ContinuousBatch: sequences joining and leaving between decodes, on the tiny reference model.

The oracle is each sequence decoded alone (generate_batch with one prompt), token for token at
temperature 0: joining, leaving, slot reuse and chunked prompts must not change any sequence.
"""

import numpy as np
import pytest
from support.batch import record_decoded_slots
from support.oracle import random_vector

from ggsteer.generation import ContinuousBatch, SequenceSampling
from ggsteer.steering.interventions import Condition

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

GREEDY = SequenceSampling(max_tokens=10)


def alone(model, prompt, controls=None, max_tokens=10) -> str:
    return model.generate_batch([prompt], [controls], max_tokens=max_tokens)[0]


def run_to_end(batch: ContinuousBatch) -> None:
    while batch.active:
        batch.step()


def add(model, batch, prompt, controls=None, sampling=GREEDY):
    from ggsteer.steering.interventions import normalize_controls

    return batch.add(model.tokenize_prompt(prompt), normalize_controls(model, controls), sampling)


def test_joining_mid_generation_changes_nobody(tiny_model):
    vector = random_vector(tiny_model, 31, scale=4.0)
    with ContinuousBatch(tiny_model) as batch:
        first = add(tiny_model, batch, "i am very happy and", [(vector, 1.0)])
        for _ in range(4):
            batch.step()
        assert len(first.generated) == 3  # one decode for the prompt, then a token per step
        second = add(tiny_model, batch, "the dog is", None)
        third = add(tiny_model, batch, "a cat and the sad dog", [(vector, -1.0)])
        run_to_end(batch)
    assert first.text == alone(tiny_model, "i am very happy and", [(vector, 1.0)])
    assert second.text == alone(tiny_model, "the dog is")
    assert third.text == alone(tiny_model, "a cat and the sad dog", [(vector, -1.0)])
    assert [s.finish_reason for s in (first, second, third)] == ["length"] * 3


def test_a_freed_slot_is_reused_with_fresh_kv(tiny_model):
    vector = random_vector(tiny_model, 32, scale=4.0)
    with ContinuousBatch(tiny_model, max_sequences=2) as batch:
        short = add(tiny_model, batch, "the dog is", [(vector, 1.0)], SequenceSampling(max_tokens=3))
        long = add(tiny_model, batch, "i am very happy and", None, SequenceSampling(max_tokens=16))
        assert not batch.fits(3, 3)  # both slots of max_sequences=2 taken
        finished = []
        while not finished:
            finished = batch.step()
        assert finished == [short] and batch.fits(3, 3)
        # the next sequence takes the freed KV sequence id; stale cells there would change its text
        later = add(tiny_model, batch, "a cat and the bad dog today", None)
        assert later.slot == short.slot
        run_to_end(batch)
    assert short.text == alone(tiny_model, "the dog is", [(vector, 1.0)], max_tokens=3)
    assert long.text == alone(tiny_model, "i am very happy and", max_tokens=16)
    assert later.text == alone(tiny_model, "a cat and the bad dog today")


def test_conditions_survive_others_joining(tiny_model):
    cond_vector = random_vector(tiny_model, 15, layers=(0, 1, 2))
    steer = random_vector(tiny_model, 16, scale=4.0)
    # threshold -1: on for any prompt, so the steering must last through the whole generation
    condition = Condition(cond_vector, -1.0, 0)
    conditioned = [tiny_model.intervention(steer, 1.0, layers=[1, 2], condition=condition)]
    with ContinuousBatch(tiny_model) as batch:
        first = add(tiny_model, batch, "i am very happy and", conditioned)
        for _ in range(3):
            batch.step()
        joined = add(tiny_model, batch, "the dog is", conditioned)  # the program is rebuilt here
        run_to_end(batch)
    assert first.text == alone(tiny_model, "i am very happy and", conditioned)
    assert joined.text == alone(tiny_model, "the dog is", conditioned)
    assert first.text != alone(tiny_model, "i am very happy and")


def test_long_prompt_is_decoded_over_several_steps(tiny_model):
    words = "the dog and the cat are very happy today and i am sad ".split()
    prompt = " ".join(words[i % len(words)] for i in range(150))
    tokens = tiny_model.tokenize_prompt(prompt)
    assert len(tokens) > tiny_model.n_batch
    with ContinuousBatch(tiny_model) as batch:
        running = add(tiny_model, batch, "the dog is", None, SequenceSampling(max_tokens=12))
        batch.step()
        long = add(tiny_model, batch, prompt, None, SequenceSampling(max_tokens=6))
        batch.step()
        assert 0 < long.n_decoded < len(tokens)  # the rest of the batch went to the prompt's first part
        run_to_end(batch)
    # Llama's own path decodes the prompt in n_batch chunks too; tokens, since the random
    # vocabulary's bytes are not valid UTF-8 and the two paths drop them differently
    expected = []
    for token in tiny_model.generate(tokens, temp=0.0):
        expected.append(token)
        if len(expected) == 6:
            break
    assert long.generated == expected
    assert running.text == alone(tiny_model, "the dog is", max_tokens=12)


def test_removed_sequence_leaves_the_others_alone(tiny_model):
    with ContinuousBatch(tiny_model) as batch:
        gone = add(tiny_model, batch, "i am very happy and")
        kept = add(tiny_model, batch, "the dog is")
        batch.step()
        batch.step()
        assert len(gone.generated) >= 1 and len(kept.generated) >= 1  # both were generating side by side
        batch.remove(gone)
        assert batch.active == [kept]
        run_to_end(batch)
    assert kept.text == alone(tiny_model, "the dog is")


def test_no_room_is_an_error(tiny_model):
    with ContinuousBatch(tiny_model) as batch:
        add(tiny_model, batch, "the dog is", None, SequenceSampling(max_tokens=200))
        with pytest.raises(ValueError, match="no room for a sequence of .* of n_ctx=256 cells"):
            add(tiny_model, batch, "the dog is", None, SequenceSampling(max_tokens=60))
        with pytest.raises(ValueError, match="at least one prompt token"):
            batch.add([], [], GREEDY)


def test_the_model_is_itself_again_after_the_batch(tiny_model):
    vector = random_vector(tiny_model, 33, scale=4.0)
    tiny_model.set_control(vector, 1.0)
    before = tiny_model.create_completion("the dog is", max_tokens=8, temperature=0)["choices"][0]["text"]
    with ContinuousBatch(tiny_model) as batch:
        add(tiny_model, batch, "a cat")
        run_to_end(batch)
    assert len(tiny_model.controls) == 1
    assert tiny_model.create_completion("the dog is", max_tokens=8, temperature=0)["choices"][0]["text"] == before


def test_churn_with_a_nearly_full_context(tiny_model):
    """Many sequences of random sizes joining as others leave: the freed cells are scattered
    through the KV cache, yet every decode finds room and every sequence equals itself alone."""
    rng = np.random.default_rng(5)
    words = "the dog and the cat are very happy today and i am sad".split()
    pending = []
    for _ in range(40):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        pending.append((prompt, SequenceSampling(max_tokens=int(rng.integers(1, 20)))))
    done = []
    with ContinuousBatch(tiny_model) as batch:
        queue = list(pending)
        while queue or batch.active:
            while queue and batch.fits(len(tiny_model.tokenize_prompt(queue[0][0])), queue[0][1].max_tokens):
                prompt, sampling = queue.pop(0)
                done.append((prompt, sampling, add(tiny_model, batch, prompt, None, sampling)))
            assert batch.reserved_cells <= tiny_model.n_ctx()
            batch.step()
    assert len(done) == 40
    for prompt, sampling, state in done:
        assert state.text == alone(tiny_model, prompt, max_tokens=sampling.max_tokens), prompt


def test_one_sequence_per_decode_decodes_each_sequence_alone(tiny_model, monkeypatch):
    vector = random_vector(tiny_model, 33, scale=4.0)
    decoded_slots = record_decoded_slots(monkeypatch)
    prompts = [("i am very happy and", [(vector, 1.0)]), ("the dog is", None),
               ("a cat and the sad dog", [(vector, -1.0)])]
    with ContinuousBatch(tiny_model, one_sequence_per_decode=True) as batch:
        states = [add(tiny_model, batch, prompt, controls) for prompt, controls in prompts]
        run_to_end(batch)
    assert all(len(slots) == 1 for slots in decoded_slots)
    assert len(decoded_slots) == 3 * (1 + GREEDY.max_tokens - 1)  # each: its prompt, then a decode per token
    monkeypatch.undo()
    assert [s.text for s in states] == [alone(tiny_model, prompt, controls) for prompt, controls in prompts]
