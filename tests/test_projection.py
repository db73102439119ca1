"""Ablate and clamp that keep the model fluent: sink rows left alone, the direction stripped of the
directions every token shares (ggsteer.vectors.projection), against numpy."""

import numpy as np
import pytest
from support.oracle import (
    ATOL,
    PROMPT,
    SUFFIXES,
    last_logits,
    numpy_op,
    random_vector,
    reference_pair_states,
    reference_with,
    unit,
)
from support.reference_model import reference_forward

from ggsteer.train import make_dataset
from ggsteer.vectors import ControlVector
from ggsteer.vectors.projection import (
    SHARED_DIRECTIONS,
    SHARED_PROMPTS,
    ablation_prompts,
    projection_for_layer,
    shared_directions,
    shared_prompts,
)

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")


@pytest.fixture(scope="module")
def trained(tiny_model):
    pairs = make_dataset("i am very {persona} and", ["happy", "good", "happy"], ["sad", "bad", "sad"], SUFFIXES)
    return pairs, ControlVector.train(tiny_model, pairs, method="mean_diff")


def hidden_all(model, layers):
    return model.hidden_states([PROMPT], layers=layers, pool="all")[0]  # [n_tokens, n_layers, n_embd]


# -- the sink rows ----------------------------------------------------------------------------


@pytest.mark.parametrize("op, strength", [("ablate", 1.0), ("clamp", -1.5)])
def test_sink_row_is_untouched_and_the_others_hit_the_target(tiny_model, op, strength):
    vector = random_vector(tiny_model, 61, scale=2.0)
    plain = hidden_all(tiny_model, [1, 2])
    tiny_model.set_control(vector, strength, layers=[1, 2], op=op)
    steered = hidden_all(tiny_model, [1, 2])
    # position 0 only attends to itself: left alone at layer 1, it is the plain row at every layer
    np.testing.assert_array_equal(steered[0], plain[0])
    for k, il in enumerate((1, 2)):
        direction, target = projection_for_layer(vector, il, op, strength)
        projections = steered[1:, k].astype(np.float64) @ direction.astype(np.float64)
        np.testing.assert_allclose(projections, target, atol=1e-3 * np.linalg.norm(steered[1:, k], axis=1).max())
        assert np.abs(plain[1:, k] @ direction - target).max() > 0.1  # the plain rows were elsewhere


def test_skip_first_zero_rewrites_the_sink_too(tiny_model):
    vector = random_vector(tiny_model, 61, scale=2.0)
    tiny_model.set_control(vector, 1.0, layers=[1], op="ablate", skip_first=0)
    steered = hidden_all(tiny_model, [1])
    direction, target = projection_for_layer(vector, 1, "ablate", 1.0)
    assert float(steered[0, 0] @ direction) == pytest.approx(target, abs=1e-3 * float(np.linalg.norm(steered[0, 0])))


def test_skip_first_counts_positions_of_every_sequence(tiny_model, tiny_weights):
    """skip_first=3 leaves positions 0-2 alone and edits the rest: the logits match numpy with the same rows edited."""
    vector = random_vector(tiny_model, 62, scale=2.0)
    tiny_model.set_control(vector, -1.0, layers=[1, 2], op="clamp", skip_first=3)
    tokens = tiny_model.tokenize_prompt(PROMPT)

    def edit(il, h, positions):
        if il not in (1, 2):
            return h
        direction, target = projection_for_layer(vector, il, "clamp", -1.0)
        clamped = numpy_op("clamp", h, np.broadcast_to(direction.astype(np.float64), h.shape), target)
        return np.where((positions >= 3)[:, None], clamped, h)

    np.testing.assert_allclose(last_logits(tiny_model), reference_with(tiny_model, tiny_weights, tokens, edit)[-1],
                               atol=ATOL, rtol=0)


def test_bad_skip_first_is_refused(tiny_model):
    vector = random_vector(tiny_model, 63)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="skip_first must be (within 0..2147483647|an integer)"):
            tiny_model.set_control(vector, 1.0, layers=[1], op="ablate", skip_first=bad)
    ops = np.array([[2, 1, -1, 0, -1, -1, 1, -1]], np.int32)
    with pytest.raises(ValueError, match="skip_first must be >= 0"):
        tiny_model.hook.set_program(ops, np.zeros(1, np.float32), np.zeros(1, np.int64), np.zeros(0, np.int32),
                                     np.zeros(0, np.float32), np.zeros(0, np.int64),
                                     np.ones(tiny_model.n_embd, np.float32), 1)


def test_plain_add_still_goes_through_the_adapter(tiny_model):
    vector = random_vector(tiny_model, 64)
    assert tiny_model.intervention(vector, 1.0, layers=[1]).is_plain_add
    assert not tiny_model.intervention(vector, 1.0, layers=[1], skip_first=1).is_plain_add


# -- what training stores and what the ops act on -----------------------------------------------


def test_training_stores_the_ablation_direction_and_its_statistics(tiny_model, tiny_weights, trained):
    pairs, vector = trained
    pos, neg = reference_pair_states(tiny_model, tiny_weights, pairs)  # as the default pool reads them
    prompts = shared_prompts([text for e in pairs for text in (e.positive, e.negative)])
    assert len(prompts) == min(SHARED_PROMPTS, 2 * len(pairs))
    states = [reference_forward(tiny_weights, tiny_model.tokenize_prompt(p), kv_f16=False)[0] for p in prompts]
    pooled = ablation_prompts([text for e in pairs for text in (e.positive, e.negative)])
    assert pooled == [text for e in pairs for text in (e.positive, e.negative)]  # 24 pairs: all of them
    # mean over every token (the sink included, as mean pooling does) of each prompt
    means = np.stack([reference_forward(tiny_weights, tiny_model.tokenize_prompt(p), kv_f16=False)[0].mean(axis=1)
                      for p in pooled])  # [n_prompts, n_layer, n_embd]
    stored = vector.layer_vector("ablation_direction")
    assert sorted(stored) == vector.layers
    for il in vector.layers:
        # numpy: top principal directions of the non-sink token states (eigh of the uncentred second
        # moment) and the sink's state (position 0: the same in every prompt), made orthonormal
        rows = np.concatenate([h[il, 1:] for h in states])
        shared = np.linalg.eigh(rows.T @ rows)[1][:, ::-1][:, :SHARED_DIRECTIONS].T
        np.testing.assert_allclose(states[0][il, 0], states[-1][il, 0], rtol=1e-5, atol=1e-5)
        basis = np.linalg.qr(np.vstack([shared, states[0][il, 0]]).T)[0].T
        if il == tiny_model.n_layer - 1:
            basis = basis[:0]  # the last layer is not captured token by token: its raw direction is kept
            u = unit(vector.directions[il].astype(np.float64))
        else:  # u' is made from the mean-pooled pair difference
            u = unit(means[0::2, il].mean(axis=0) - means[1::2, il].mean(axis=0))
            assert float(u @ unit(vector.directions[il].astype(np.float64))) < 0.9999  # not the trained direction
        expected = u - basis.T @ (basis @ u)
        expected /= np.linalg.norm(expected)
        assert float(stored[il] @ expected) > 0.9999, f"layer {il}: cos {float(stored[il] @ expected):.6f}"
        assert np.abs(basis @ stored[il]).max(initial=0.0) < 1e-3  # nothing left along the shared directions
        if il != tiny_model.n_layer - 1:
            sink = states[0][il, 0]  # nor along the sink's state
            assert abs(float(sink @ stored[il])) < 1e-5 * float(np.linalg.norm(sink))
        mid = (pos[:, il] + neg[:, il]) / 2
        assert vector.layer_stat("ablation_center")[il] == pytest.approx(float((mid @ expected).mean()),
                                                                         rel=1e-3, abs=1e-3)
        assert vector.layer_stat("ablation_gap")[il] == pytest.approx(
            float(((pos[:, il] - neg[:, il]) @ expected).mean()), rel=1e-3, abs=1e-3)
        direction, target = projection_for_layer(vector, il, "clamp", 0.5)
        np.testing.assert_array_equal(direction, stored[il])
        assert target == pytest.approx(vector.layer_stat("ablation_center")[il]
                                       + 0.5 * vector.layer_stat("ablation_gap")[il])


def test_ablation_prompts_take_whole_pairs_spread_over_the_dataset():
    prompts = [f"{side} {i}" for i in range(10) for side in ("pos", "neg")]
    assert ablation_prompts(prompts, n_pairs=3) == ["pos 0", "neg 0", "pos 4", "neg 4", "pos 9", "neg 9"]
    assert ablation_prompts(prompts, n_pairs=64) == prompts


@pytest.mark.parametrize("op, strength", [("ablate", 1.0), ("clamp", 1.0), ("clamp", -1.0)])
def test_trained_vector_is_clamped_along_the_ablation_direction(tiny_model, tiny_weights, trained, op, strength):
    _, vector = trained
    tiny_model.set_control(vector, strength, layers=[1, 2], op=op)
    tokens = tiny_model.tokenize_prompt(PROMPT)
    directions = vector.layer_vector("ablation_direction")

    def edit(il, h, positions):
        if il not in (1, 2):
            return h
        shift = 0.0 if op == "ablate" else strength
        target = vector.layer_stat("ablation_center")[il] + shift * vector.layer_stat("ablation_gap")[il]
        clamped = numpy_op("clamp", h, np.broadcast_to(directions[il].astype(np.float64), h.shape), target)
        return np.where((positions >= 1)[:, None], clamped, h)

    expected = reference_with(tiny_model, tiny_weights, tokens, edit)[-1]
    got = last_logits(tiny_model)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    # the raw direction gives other logits: the test tells the two apart
    raw = ControlVector(vector.directions, "llama",
                        {"unit": "gap", "layers": vector.layers, "center": list(vector.metadata["center"])})
    tiny_model.set_control(raw, strength, layers=[1, 2], op=op)
    assert np.abs(last_logits(tiny_model) - got).max() > 100 * ATOL


@pytest.mark.parametrize("op, strength", [("ablate", 0.0), ("clamp", 1.0)])
def test_every_row_op_moves_the_sink_only_by_the_target(tiny_model, trained, op, strength):
    """u' is orthogonal to the sink's state, so even skip_first=0 (what a weight bake must do) moves
    the sink row by the target alone, along u', and the other rows by their own distance to it."""
    _, vector = trained
    layers = [1, 2]
    plain = hidden_all(tiny_model, layers)
    with tiny_model.steer(vector, strength, layers=[1], op=op, skip_first=0):
        steered = hidden_all(tiny_model, layers)
    direction, target = projection_for_layer(vector, 1, op, strength)
    u = direction.astype(np.float64)
    assert abs(float(plain[0, 0] @ u)) < 1e-5 * float(np.linalg.norm(plain[0, 0]))
    np.testing.assert_allclose(steered[0, 0], plain[0, 0] + target * u, rtol=0, atol=1e-3)
    expected = plain[1:, 0] + np.outer(target - plain[1:, 0] @ u, u)
    np.testing.assert_allclose(steered[1:, 0], expected, rtol=0, atol=1e-3)
    assert np.abs(plain[1:, 0] @ u - target).max() > 0.1  # the other rows did move


def test_ablation_direction_survives_files_and_layer_selection(tmp_path, trained):
    _, vector = trained
    path = tmp_path / "v.gguf"
    vector.save(path)
    loaded = ControlVector.load(path)
    for il in vector.layers:
        np.testing.assert_array_equal(loaded.layer_vector("ablation_direction")[il],
                                      vector.layer_vector("ablation_direction")[il])
        assert loaded.layer_stat("ablation_gap")[il] == pytest.approx(vector.layer_stat("ablation_gap")[il], rel=1e-6)
    only = vector.select_layers([2])
    np.testing.assert_array_equal(only.layer_vector("ablation_direction")[2],
                                  vector.layer_vector("ablation_direction")[2])
    assert only.layer_stat("ablation_center") == {2: vector.layer_stat("ablation_center")[2]}


def test_vector_without_statistics_falls_back_to_its_own_direction(tiny_model):
    vector = random_vector(tiny_model, 65, scale=2.0)
    direction, target = projection_for_layer(vector, 1, "clamp", 0.5)
    np.testing.assert_allclose(direction, unit(vector.directions[1]), atol=1e-7)
    assert target == pytest.approx(0.5 * float(np.linalg.norm(vector.directions[1])), rel=1e-6)


# -- the ablation view ----------------------------------------------------------------------------


def test_ablation_view_reports_what_direct_measurements_give(tiny_model, trained):
    from ggsteer.evaluate import behaviour_scores, fluency_cost, unsteered_perplexity
    from ggsteer.evaluate.ablation import ablation_view

    _, vector = trained
    items = [{"prompt": "i feel", "positive": " happy", "negative": " sad"},
             {"prompt": "the dog is", "positive": " good", "negative": " bad"}]
    asking = [{**item, "prompt": f"i am very happy and {item['prompt']}"} for item in items]
    opposite = [{**item, "prompt": f"i am very sad and {item['prompt']}"} for item in items]
    texts = ["the dog is good and i love the cat", "today i feel sad and the dog"]
    view = ablation_view(tiny_model, vector, items, asking, opposite=opposite, layers=[1, 2], neutral_texts=texts)
    assert view.layers == [1, 2] and view.op == "ablate"
    with tiny_model.unsteered():
        neutral = float(behaviour_scores(tiny_model, items).mean())
        asked = float(behaviour_scores(tiny_model, asking).mean())
        opposed = float(behaviour_scores(tiny_model, opposite).mean())
    with tiny_model.steer(vector, 0.0, op="ablate", layers=[1, 2]):
        ablated = float(behaviour_scores(tiny_model, asking).mean())
        opposed_ablated = float(behaviour_scores(tiny_model, opposite).mean())
        cost = fluency_cost(tiny_model, texts)
    assert (view.neutral_behaviour, view.asking_behaviour, view.ablated_behaviour) == pytest.approx(
        (neutral, asked, ablated), abs=1e-5)
    assert (view.opposite_behaviour, view.opposite_ablated) == pytest.approx((opposed, opposed_ablated), abs=1e-5)
    assert abs(opposed - neutral) >= 0.1, "the test needs an opposite persona that moves the score"
    assert view.opposite_recovery == pytest.approx((opposed - opposed_ablated) / (opposed - neutral), abs=1e-4)
    assert view.gap_left == pytest.approx((ablated - opposed_ablated) / (asked - opposed), abs=1e-4)
    with tiny_model.steer(vector, 0.0, op="ablate", layers=[1, 2]):
        assert view.neutral_ablated == pytest.approx(float(behaviour_scores(tiny_model, items).mean()), abs=1e-5)
    assert view.kl == pytest.approx(cost.kl) and view.kl > 0
    assert view.perplexity_ratio == pytest.approx(cost.perplexity / unsteered_perplexity(tiny_model, texts), rel=1e-6)
    if abs(asked - neutral) >= 0.1:
        assert view.recovery == pytest.approx((asked - ablated) / (asked - neutral), abs=1e-4)
    else:
        assert view.recovery is None
    # along the direction the op acts on, the non-sink rows all sit at the target: the spread is gone
    assert min(view.spread_shrink.values()) > 1e3
    assert min(view.raw_spread_shrink.values()) < min(view.spread_shrink.values())


@pytest.mark.parametrize("n_rows", [3, 50, 700])
def test_shared_directions_span_the_top_singular_vectors(n_rows):
    rng = np.random.default_rng(n_rows)
    scales = np.r_[[40.0, 20.0, 10.0, 5.0], np.ones(60)]
    rows = rng.normal(size=(n_rows, 64)) * scales + 3.0  # a shared offset, then decaying directions
    got = shared_directions(rows)
    k = min(4, n_rows)
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    assert got.shape == (k, 64)
    np.testing.assert_allclose(got @ got.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(got.T @ got, vt[:k].T @ vt[:k], atol=1e-8)  # the same subspace
