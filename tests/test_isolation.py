"""Steering never leaks between the sequences of a batch (issue 12): an unsteered sequence's greedy
text is the same whatever vectors its neighbours carry, in batches of the same size. (Across batch
sizes llama.cpp's CPU kernels may round differently, so only same-size batches are compared.)"""

from __future__ import annotations

import numpy as np
import pytest

from ggsteer.vectors import ControlVector

PROMPTS = ["The weather today is", "My favourite food is", "Once upon a time", "The meeting was about"]
TOKENS = 24


def random_vectors(model, layers) -> list[ControlVector]:
    rng = np.random.default_rng(3)
    return [ControlVector({il: rng.normal(size=model.n_embd).astype(np.float32) * 2 for il in layers},
                          model.model_hint, {"unit": "gap"}) for _ in range(2)]


def check_isolation(model, layers) -> None:
    v, w = random_vectors(model, layers)
    neighbourhoods = [[None, None, None], [(v, 1.0), (v, -1.0), (w, 2.0)], [(w, -2.0), None, (v, 0.5)]]
    runs = [model.generate_batch(PROMPTS, [None, *neighbours], TOKENS, temperature=0.0)
            for neighbours in neighbourhoods]
    assert runs[1][0] == runs[0][0] and runs[2][0] == runs[0][0]
    # the neighbours were steered: their own texts changed
    assert runs[1][1] != runs[0][1] and runs[1][3] != runs[0][3]


@pytest.mark.usefixtures("unsteered_tiny_model")
def test_an_unsteered_sequence_ignores_its_neighbours_vectors(tiny_model):
    check_isolation(tiny_model, layers=(1, 2))


@pytest.mark.default_model
def test_an_unsteered_sequence_ignores_its_neighbours_vectors_on_the_default_model(default_model):
    check_isolation(default_model, layers=range(3, 15))
