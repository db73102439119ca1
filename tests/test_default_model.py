"""Behaviour on the embedded default model (Gemma 3 270M): directions that steer, files llama.cpp applies."""

import numpy as np
import pytest

from ggsteer.evaluate import behaviour_scores
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def happy_vector(default_model):
    pairs = preset_dataset("happy", max_suffixes=40)
    return ControlVector.train(default_model, pairs, method="mean_diff")


@pytest.fixture(autouse=True)
def unsteered(default_model):
    default_model.reset_control()
    yield
    default_model.reset_control()


def test_happy_vector_separates_pairs(happy_vector):
    separation = happy_vector.layer_stat("separation")
    middle = [separation[il] for il in happy_vector.recommended_layers]
    # measured 0.67-0.83 with 120 pairs: clearly above chance (0.5), though not every pair agrees
    assert min(middle) >= 0.6
    assert np.mean(middle) >= 0.7
    assert happy_vector.recommended_layers == list(range(3, 15))


def test_strength_moves_cheerful_vs_gloomy_monotonically(default_model, happy_vector):
    items = load_eval_prompts("happy")  # held out: not training suffixes
    means = []
    for strength in (-0.6, -0.3, 0.0, 0.3, 0.6):
        default_model.set_control(happy_vector, strength)
        means.append(float(behaviour_scores(default_model, items).mean()))
    assert means == sorted(means), f"behaviour score not monotone in strength: {means}"
    assert means[-1] > means[2] + 1.0  # positive strength: cheerful continuations gain
    assert means[0] < means[2] - 1.0  # negative strength: gloomy ones gain


def test_saved_file_round_trips_and_steers_the_same(default_model, happy_vector, tmp_path):
    path = tmp_path / "happy.gguf"
    happy_vector.save(path)
    loaded = ControlVector.load(path)
    assert loaded.layers == happy_vector.layers
    for il in loaded.layers:
        np.testing.assert_array_equal(loaded.directions[il], happy_vector.directions[il])
    items = load_eval_prompts("happy")[:4]
    default_model.set_control(happy_vector, 0.5)
    direct = behaviour_scores(default_model, items)
    default_model.set_control(loaded, 0.5)
    np.testing.assert_array_equal(behaviour_scores(default_model, items), direct)


def test_vector_for_another_model_is_refused(default_model):
    other = ControlVector({1: np.ones(48, np.float32)}, "llama", {"unit": "gap"})
    with pytest.raises(ValueError, match="n_embd 48 but the model has n_embd 640"):
        default_model.set_control(other, 0.5)


def test_ablating_happy_direction_lowers_cheerful_gap(default_model, happy_vector):
    from ggsteer.evaluate import continuation_logprobs

    items = load_eval_prompts("happy")[:8]
    persona = "Act as if you are an extremely happy person. "
    pairs = ([(persona + it["prompt"], it["positive"]) for it in items]
             + [(persona + it["prompt"], it["negative"]) for it in items])

    def mean_gap():
        logprobs = continuation_logprobs(default_model, pairs)
        return float((logprobs[: len(items)] - logprobs[len(items) :]).mean())

    plain = mean_gap()
    default_model.set_control(happy_vector, 1.0, op="ablate")
    ablated = mean_gap()
    assert ablated < plain - 0.2, f"ablation did not lower the cheerful gap: {plain:.3f} -> {ablated:.3f}"


def test_ablating_happy_direction_keeps_the_model_fluent(default_model, happy_vector):
    """Issue 16: ablating along the raw direction on every row gave KL ~4 and "I I I I ..."; the
    direction without the shared directions and the sink's state keeps the text, even on every row
    (what a weight bake must do)."""
    from ggsteer.evaluate import fluency_cost, load_neutral_texts, unsteered_perplexity

    texts = load_neutral_texts()[:4]
    plain_perplexity = unsteered_perplexity(default_model, texts)
    default_model.set_control(happy_vector, 1.0, op="ablate")
    cost = fluency_cost(default_model, texts)
    default_model.set_control(happy_vector, 1.0, op="ablate", skip_first=0)
    every_row = fluency_cost(default_model, texts)
    raw = ControlVector(happy_vector.directions, happy_vector.model_hint,
                        {k: v for k, v in happy_vector.metadata.items() if not k.startswith("ablation_")})
    default_model.set_control(raw, 1.0, op="ablate", skip_first=0)
    raw_every_row = fluency_cost(default_model, texts)
    for name, measured in (("ablate", cost), ("ablate on every row", every_row)):
        assert measured.kl <= 0.5, f"{name} costs KL {measured.kl:.3f} on neutral text"
        assert measured.perplexity <= 1.5 * plain_perplexity, (
            f"{name}: perplexity {measured.perplexity:.1f} vs {plain_perplexity:.1f}")
    assert raw_every_row.kl > 2.0, f"the raw direction on every row should break the text: KL {raw_every_row.kl:.3f}"


def test_ablation_erases_what_the_persona_asks_for(default_model):
    """Issue 16: on prompts behind the honest personas and behind the dishonest ones, ablating the
    honest direction leaves little of the difference between them. u' made from the last-token
    trained direction left 43% of it; made from the mean-pooled pair difference, 4%."""
    from ggsteer.evaluate.ablation import asking_items

    vector = ControlVector.train(default_model, preset_dataset("honest", max_suffixes=40), method="mean_diff")
    items = load_eval_prompts("honest")
    asking, opposite = asking_items("honest", items), asking_items("honest", items, side="negative")

    def persona_gap():
        return float(behaviour_scores(default_model, asking).mean() - behaviour_scores(default_model, opposite).mean())

    plain = persona_gap()
    default_model.set_control(vector, 0.0, op="ablate")
    ablated = persona_gap()
    assert plain > 1.0, f"the personas should move the honest score apart: {plain:.3f}"
    assert abs(ablated) <= 0.2 * plain, f"ablation left {ablated:.3f} of the personas' {plain:.3f}"


def test_when_generated_keeps_prompt_states(default_model, happy_vector):
    import llama_cpp

    tokens = default_model.tokenize_prompt("The weather this morning was")

    def first_logits():
        default_model.reset()
        default_model.eval(tokens)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(default_model.ctx, -1),
                                     shape=(default_model.n_vocab(),)).copy()

    plain = first_logits()
    default_model.set_control(happy_vector, 1.0, when="generated")
    np.testing.assert_array_equal(first_logits(), plain)
    default_model.set_control(happy_vector, 1.0)
    assert np.abs(first_logits() - plain).max() > 0.1


def test_demo_trains_writes_and_steers(capsys, monkeypatch, default_model, tmp_path):
    from ggsteer import cli

    monkeypatch.setenv("GGSTEER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "happy.gguf"
    argv = ["demo", "--model", default_model.model_path, "-o", str(out), "-n", "12", "--threads", "2"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    vector = ControlVector.load(out)
    vector.check_model(default_model)
    assert vector.layers == list(range(1, default_model.n_layer))
    assert all(np.isfinite(vector.directions[il]).all() for il in vector.layers)
    assert "training a happy/sad vector" in first.err
    cached = list((tmp_path / "cache" / "vectors").glob("demo-happy-*.gguf"))
    assert len(cached) == 1 and cached[0].read_bytes() == out.read_bytes()
    # three prompts, each shown unsteered and steered both ways, with text that differs
    blocks = [line for line in first.out.splitlines()
              if line.strip().startswith(("baseline", "happy +0.6", "sad  -0.6"))]
    assert len(blocks) == 9
    for start in range(0, 9, 3):
        texts = [line.split("|", 1)[1] for line in blocks[start : start + 3]]
        assert len(set(texts)) == 3, texts
    assert f"--control-vector-scaled {out} 0.6" in first.out

    # a second run reuses the cached vector and leaves a differing output file alone
    out.write_bytes(b"not mine")
    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert "using the cached vector" in second.err and "left untouched" in second.err
    assert out.read_bytes() == b"not mine"
    assert second.out.splitlines()[:-2] == first.out.splitlines()[:-2]


def test_baked_ablation_keeps_gemma_fluent_and_erases_the_personas(happy_vector, tmp_path):
    """Issue 16: the approximate Gemma bake (the next block's value projection reads without u) stays
    near the plain model (it was KL 10-23 with the writers orthogonalised, and with the FFN readers
    edited as well every prompt moved by about -3 nats) and takes away most of what the happy and
    sad personas do to the happy score."""
    from ggsteer import SteeredModel, default_model_path
    from ggsteer.bake import bake_model
    from ggsteer.evaluate import load_neutral_texts
    from ggsteer.evaluate.ablation import asking_items

    baked_path = tmp_path / "baked.gguf"
    bake_model(default_model_path(), baked_path, ablate=[happy_vector], layers=list(range(3, 15)), approximate=True)
    texts = load_neutral_texts()[:3]
    items = load_eval_prompts("happy")
    asking, opposite = asking_items("happy", items), asking_items("happy", items, side="negative")

    def log_probs(model):
        out = []
        for text in texts:
            model.reset()
            tokens = model.tokenize_prompt(text)
            model.eval(tokens)
            scores = np.asarray(model.scores[: len(tokens)], dtype=np.float64)
            shifted = scores - scores.max(axis=-1, keepdims=True)
            out.append(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))
        return np.concatenate(out)

    logprobs, persona_gap, plain_score = {}, {}, {}
    for name, path in (("plain", default_model_path()), ("baked", baked_path)):
        model = SteeredModel(model_path=str(path), n_ctx=2048, n_threads=2, logits_all=True)  # scores of every row
        try:
            logprobs[name] = log_probs(model)
            persona_gap[name] = float(behaviour_scores(model, asking).mean() - behaviour_scores(model, opposite).mean())
            plain_score[name] = float(behaviour_scores(model, items).mean())
        finally:
            model.close()
    plain, baked = logprobs["plain"], logprobs["baked"]
    assert np.abs(plain).min() > 0  # every row was scored
    kl = float((np.exp(plain) * (plain - baked)).sum(axis=-1).mean())
    assert kl <= 0.5, f"KL(plain || baked ablation) {kl:.3f}"
    assert persona_gap["plain"] > 2.0, persona_gap
    assert abs(persona_gap["baked"]) <= 0.25 * persona_gap["plain"], persona_gap
    assert abs(plain_score["baked"] - plain_score["plain"]) < 1.5, plain_score  # no big shift of every prompt
