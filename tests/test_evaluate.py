"""Evaluation and calibration: metrics against the numpy reference, sweeps, plots and the CLI."""

import struct

import numpy as np
import pytest
from support.reference_model import reference_forward

from ggsteer import cli, evaluate
from ggsteer.cli.common import load_vectors
from ggsteer.cli.evaluate import parse_strengths
from ggsteer.evaluate import (
    Calibration,
    Sweep,
    SweepPoint,
    choose_calibration,
    fluency,
    fluency_cost,
    fluency_sweep,
    layer_windows,
    side_by_side,
    steerability,
    strength_sweep,
    unsteered_perplexity,
    wrong_way_share,
)
from ggsteer.evaluate.plot import plot_sweeps
from ggsteer.train import load_eval_prompts, preset_dataset
from ggsteer.vectors import ControlVector

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

# Logits match the float64 reference to ~1e-5 (test_steer.py: ATOL 5e-5), so log-probabilities,
# their means and the KL built from them agree to well under 1e-4.
TOL = 1e-4
TEXTS = ["i am very happy and the dog", "the cat is sad today", "you love the good dog and i hate the bad cat", "good"]
STEERED_LAYERS = (1, 2)


def random_vector(n_embd, seed=0, scale=1.5, layers=STEERED_LAYERS):
    rng = np.random.default_rng(seed)
    return ControlVector({il: rng.normal(size=n_embd).astype(np.float32) * scale for il in layers}, "llama",
                         {"unit": "gap"})


def reference_log_softmax(model, weights, text, added=None):
    """float64 log-softmax of the reference logits at every position of `text`."""
    added = added or {}
    tokens = model.tokenize_prompt(text)
    hook = lambda il, h: h + added[il] if il in added else h  # noqa: E731
    _, logits = reference_forward(weights, tokens, kv_f16=False, block_output_hook=hook)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return tokens, shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference_fluency(model, weights, vector, strength):
    """Mean KL(unsteered || steered) over every position and perplexity, all in numpy."""
    kls, nlls = [], []
    for text in TEXTS:
        tokens, log_p = reference_log_softmax(model, weights, text)
        _, log_q = reference_log_softmax(model, weights, text,
                                         {il: strength * vector.directions[il] for il in STEERED_LAYERS})
        kls.extend((np.exp(log_p) * (log_p - log_q)).sum(axis=1))
        nlls.extend(-log_q[pos - 1, tokens[pos]] for pos in range(1, len(tokens)))
    return np.mean(kls), np.exp(np.mean(nlls))


# -- metrics against the reference ----------------------------------------------------------------


@pytest.mark.parametrize("rows_per_decode", [None, 9])  # None: all texts in one decode; 9: texts split over decodes
def test_kl_and_perplexity_match_reference(tiny_model, tiny_weights, monkeypatch, rows_per_decode):
    if rows_per_decode:
        monkeypatch.setattr(side_by_side, "LOGITS_BUDGET_BYTES", rows_per_decode * 4 * tiny_model.n_vocab())
    vector = random_vector(tiny_model.n_embd)
    strengths = [0.7, -1.2]
    costs = fluency_sweep(tiny_model, vector, strengths, layers=list(STEERED_LAYERS), texts=TEXTS)
    for strength, cost in zip(strengths, costs):
        kl, perplexity = reference_fluency(tiny_model, tiny_weights, vector, strength)
        assert kl > 1e-3  # the vector really moves the distribution
        assert cost.kl == pytest.approx(kl, abs=TOL)
        assert cost.perplexity == pytest.approx(perplexity, rel=TOL)
        assert cost.n_positions == sum(len(tiny_model.tokenize_prompt(t)) for t in TEXTS)
    _, plain_perplexity = reference_fluency(tiny_model, tiny_weights, vector, 0.0)
    assert unsteered_perplexity(tiny_model, TEXTS) == pytest.approx(plain_perplexity, rel=TOL)


def test_strength_zero_costs_nothing(tiny_model):
    # strength 0 adds exact zeros; the plain and the zero-strength copy of a text sit in different
    # KV cells of one decode, which changes only the order of attention's float sums (~1e-9 nats)
    vector = random_vector(tiny_model.n_embd, seed=1)
    zero, one = fluency_sweep(tiny_model, vector, [0.0, 1.0], layers=list(STEERED_LAYERS), texts=TEXTS)
    assert 0.0 <= zero.kl < 1e-8
    assert one.kl > 1e-3
    assert zero.perplexity == pytest.approx(unsteered_perplexity(tiny_model, TEXTS), rel=1e-6)


def test_fluency_cost_uses_current_controls_and_keeps_them(tiny_model):
    vector = random_vector(tiny_model.n_embd, seed=2)
    (expected,) = fluency_sweep(tiny_model, vector, [0.5], layers=list(STEERED_LAYERS), texts=TEXTS)
    tiny_model.set_control(vector, 0.5, layers=list(STEERED_LAYERS))
    controls = tiny_model.controls
    assert fluency_cost(tiny_model, TEXTS) == expected
    assert tiny_model.controls == controls


def test_fluency_under_a_hook_intervention_matches_reference(tiny_model, tiny_weights):
    # ablation runs in ggsteer's native hook, not llama.cpp's adapter: the decodes must describe their rows to it
    vector = random_vector(tiny_model.n_embd, seed=5)
    units = {il: vector.directions[il] / np.linalg.norm(vector.directions[il]) for il in STEERED_LAYERS}
    tiny_model.set_control(vector, 1.0, layers=list(STEERED_LAYERS), op="ablate")
    cost = fluency_cost(tiny_model, TEXTS)
    kls, nlls = [], []
    for text in TEXTS:
        tokens = tiny_model.tokenize_prompt(text)
        _, log_p = reference_log_softmax(tiny_model, tiny_weights, text)
        # ablate leaves the attention sink (position 0) alone
        hook = lambda il, h: np.vstack([h[:1], (h - np.outer(h @ units[il], units[il]))[1:]]) if il in units else h  # noqa: E731
        _, logits = reference_forward(tiny_weights, tokens, kv_f16=False, block_output_hook=hook)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_q = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        kls.extend((np.exp(log_p) * (log_p - log_q)).sum(axis=1))
        nlls.extend(-log_q[pos - 1, tokens[pos]] for pos in range(1, len(tokens)))
    assert np.mean(kls) > 1e-3
    assert cost.kl == pytest.approx(np.mean(kls), abs=TOL)
    assert cost.perplexity == pytest.approx(np.exp(np.mean(nlls)), rel=TOL)


def test_behaviour_scores_in_a_sweep_match_reference(tiny_model, tiny_weights):
    items = [{"prompt": "i am very", "positive": " happy and good", "negative": " sad"},
             {"prompt": "the dog", "positive": " is good", "negative": " is bad today"}]
    vector = random_vector(tiny_model.n_embd, seed=3)
    sweep = strength_sweep(tiny_model, vector, [-0.8, 0.8], items, layers=list(STEERED_LAYERS), neutral_texts=TEXTS[:2])

    def reference_score(item, strength):
        added = {il: strength * vector.directions[il] for il in STEERED_LAYERS}
        gap = 0.0
        for side, sign in (("positive", 1), ("negative", -1)):
            n_prompt = len(tiny_model.tokenize_prompt(item["prompt"]))
            tokens, log_q = reference_log_softmax(tiny_model, tiny_weights, item["prompt"] + item[side], added)
            gap += sign * sum(log_q[pos - 1, tokens[pos]] for pos in range(n_prompt, len(tokens)))
        return gap

    baseline = np.mean([reference_score(item, 0.0) for item in items])
    assert sweep.baseline_behaviour == pytest.approx(baseline, abs=TOL)
    for point in sweep.points:
        expected = np.mean([reference_score(item, point.strength) for item in items])
        assert point.behaviour == pytest.approx(expected, abs=TOL)
        assert point.gain == pytest.approx(expected - baseline, abs=TOL)
    assert sweep.layers == list(STEERED_LAYERS)


def test_layer_sweep_equals_one_sweep_per_range(tiny_model):
    """Every range's strengths decoded side by side, the plain model once for all ranges."""
    from ggsteer.evaluate import layer_sweep

    items = [{"prompt": "i am very", "positive": " happy and good", "negative": " sad"}]
    vector = random_vector(tiny_model.n_embd, seed=4)
    ranges = [[1], [1, 2]]
    together = layer_sweep(tiny_model, vector, [-0.5, 0.7], items, ranges, neutral_texts=TEXTS[:2])
    for sweep, layers in zip(together, ranges):
        alone = strength_sweep(tiny_model, vector, [-0.5, 0.7], items, layers=layers, neutral_texts=TEXTS[:2])
        assert sweep.layers == layers
        np.testing.assert_allclose(sweep.column("behaviour"), alone.column("behaviour"), atol=1e-5)
        np.testing.assert_allclose(sweep.column("kl"), alone.column("kl"), atol=1e-7)
        assert sweep.baseline_behaviour == pytest.approx(alone.baseline_behaviour, abs=1e-5)
    assert not np.allclose(together[0].column("kl"), together[1].column("kl"))


def test_a_prompt_longer_than_a_decode_is_refused_by_name(tiny_model):
    from ggsteer.evaluate import behaviour_scores

    items = [{"prompt": " ".join(["the happy dog"] * 60), "positive": " good", "negative": " bad"}]
    with pytest.raises(ValueError, match=r"does not fit n_batch=128 \(raise n_batch\)"):
        behaviour_scores(tiny_model, items)


def test_one_sequence_context_scores_each_continuation_alone(tiny_model, tiny_model_path):
    """A context of one sequence cannot share a prompt between two continuations: each is decoded
    with its own copy of the prompt, and the scores stay the same."""
    from support.models import TIGHT_LLAMA_KWARGS

    from ggsteer import SteeredModel
    from ggsteer.evaluate import behaviour_scores

    items = [{"prompt": "i am very", "positive": " happy and good", "negative": " sad"},
             {"prompt": "the dog", "positive": " is good", "negative": " is bad today"}]
    single = SteeredModel(tiny_model_path, n_ctx=256, n_batch=128, n_seq_max=1, **TIGHT_LLAMA_KWARGS)
    try:
        np.testing.assert_allclose(behaviour_scores(single, items), behaviour_scores(tiny_model, items), atol=1e-5)
    finally:
        single.close()


# -- summaries --------------------------------------------------------------------------------


def test_steerability_is_the_slope_near_zero():
    strengths = [-1.0, -0.2, -0.1, 0.0, 0.1, 0.2, 1.0]
    scores = [-50.0, -0.4, -0.2, 0.0, 0.2, 0.4, 9.0]  # slope 2 near 0, far points ignored
    assert steerability(strengths, scores) == pytest.approx(2.0)
    # fewer than three within 0.25: the three nearest 0
    assert steerability([-1.0, 0.0, 0.5, 2.0], [-3.0, 0.0, 1.5, 100.0]) == pytest.approx(3.0)


def test_wrong_way_share():
    baseline = np.array([0.0, 1.0, 2.0, 3.0])
    assert wrong_way_share(0.5, np.array([1.0, 0.5, 2.5, 2.0]), baseline) == 0.5
    assert wrong_way_share(-0.5, np.array([1.0, 0.5, 2.5, 2.0]), baseline) == 0.5
    assert wrong_way_share(-0.5, baseline - 1, baseline) == 0.0
    assert wrong_way_share(0.0, baseline, baseline) is None


def sweep_of(layers, rows):
    points = [SweepPoint(s, b, b - 1.0, 0.0, kl, 20 + 10 * kl) for s, b, kl in rows]
    return Sweep(list(layers), 1.0, 20.0, 4.0, points)


def test_choose_calibration_takes_largest_gain_under_the_bound():
    wide = sweep_of(range(3, 15), [(-0.5, -2.0, 0.2), (0.25, 2.0, 0.05), (0.5, 3.0, 0.2), (1.0, 5.0, 0.9)])
    narrow = sweep_of(range(7, 11), [(0.5, 2.5, 0.1), (1.0, 3.5, 0.24)])
    chosen = choose_calibration([wide, narrow], max_kl=0.25)
    assert chosen == Calibration(1.0, list(range(7, 11)), 2.5, 0.24, 0.25)
    assert choose_calibration([wide], max_kl=1.0).strength == 1.0
    with pytest.raises(ValueError, match="no positive strength raised the behaviour score with KL <= 0.01"):
        choose_calibration([wide, narrow], max_kl=0.01)


def test_layer_windows():
    vector = ControlVector({il: np.ones(4, np.float32) for il in range(1, 18)}, "gemma3",
                           {"unit": "gap", "recommended_layers": list(range(3, 15))})
    assert layer_windows(vector, 18) == [list(range(3, 15)), list(range(1, 7)), list(range(7, 13)), list(range(13, 18))]


def test_infer_preset_from_calibration_or_dataset_hash():
    from ggsteer.train import dataset_hash

    vector = ControlVector({1: np.ones(4, np.float32)}, "llama", {"dataset_hash": dataset_hash(preset_dataset("calm"))})
    assert evaluate.infer_preset(vector) == "calm"
    vector.metadata["eval_preset"] = "honest"  # a calibration's record wins
    assert evaluate.infer_preset(vector) == "honest"
    vector.metadata = {"dataset_hash": dataset_hash(preset_dataset("calm", max_suffixes=40))}
    assert evaluate.infer_preset(vector) is None


@pytest.mark.parametrize("text, values", [
    ("-0.3:0.3:13", [round(-0.3 + 0.05 * k, 10) + 0.0 for k in range(13)]),
    ("0.3:-0.3:3", [-0.3, 0.0, 0.3]),
    ("0.5:0.5:1", [0.5]),
    ("0.2, -0.1,0.2", [-0.1, 0.2]),
])
def test_parse_strengths(text, values):
    assert parse_strengths(text) == values


# -- plot ---------------------------------------------------------------------------------------


def test_plot_is_a_png_with_both_panels(tmp_path):
    wide = sweep_of(range(3, 15), [(-0.5, -2.0, 0.2), (0.0, 1.0, 0.0), (0.5, 3.0, 0.2), (1.0, 5.0, 0.9)])
    narrow = sweep_of(range(7, 11), [(-0.5, -0.5, 0.1), (0.0, 1.0, 0.0), (0.5, 2.5, 0.1), (1.0, 3.5, 0.24)])
    path = tmp_path / "sweep.png"
    plot_sweeps([wide, narrow], path, title="test", calibration=Calibration(1.0, list(range(7, 11)), 2.5, 0.24, 0.25))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 1000 and height > 400
    assert len(data) > 30_000  # two panels of curves, labels and legends, not an empty canvas


# -- CLI errors (all before or right after loading the tiny model) ------------------------------


@pytest.fixture
def tiny_vector_file(tiny_model, tmp_path):
    path = tmp_path / "tiny.gguf"
    random_vector(tiny_model.n_embd, seed=4).save(path)
    return path


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_vector_for_another_model(capsys, tiny_model_path, tmp_path):
    path = tmp_path / "other.gguf"
    ControlVector({1: np.ones(7, np.float32)}, "llama", {"unit": "gap"}).save(path)
    code, err = run_cli(capsys, "eval", path, "--model", tiny_model_path, "--preset", "happy")
    assert code == 2
    assert "vector has n_embd 7 but the model" in err and "has n_embd 48" in err


@pytest.mark.parametrize("spec", ["0.3:-0.3:0", "1:2:0"])
def test_cli_empty_strengths_range(capsys, tiny_vector_file, spec):
    code, err = run_cli(capsys, "eval", tiny_vector_file, f"--strengths={spec}")
    assert code == 2
    assert f"empty --strengths range {spec!r}" in err and "N must be at least 1" in err


@pytest.mark.parametrize("spec, message",
                         [("1:2", "use A:B:N"), ("a,b", "'a' is not a number"), ("0:1:2.5", "whole number")])
def test_cli_bad_strengths(capsys, tiny_vector_file, spec, message):
    code, err = run_cli(capsys, "eval", tiny_vector_file, f"--strengths={spec}")
    assert code == 2 and message in err


def test_cli_unwritable_outputs(capsys, tiny_vector_file):
    code, err = run_cli(capsys, "eval", tiny_vector_file, "--json", "/nonexistent/dir/x.json")
    assert code == 2
    assert "cannot write --json /nonexistent/dir/x.json: the directory /nonexistent/dir does not exist" in err
    code, err = run_cli(capsys, "eval", tiny_vector_file, "--plot", tiny_vector_file.parent)
    assert code == 2 and "it is a directory" in err


def test_cli_calibrate_refuses_existing_output(capsys, tiny_vector_file):
    code, err = run_cli(capsys, "calibrate", tiny_vector_file, "-o", tiny_vector_file)
    assert code == 2 and "already exists: pass --force" in err
    code, err = run_cli(capsys, "calibrate", tiny_vector_file, "--strengths=-1:0:3")
    assert code == 2 and "no positive strength" in err


def test_cli_preset_unknown_or_not_inferable(capsys, tiny_vector_file, tiny_model_path):
    code, err = run_cli(capsys, "eval", tiny_vector_file, "--preset", "cheerful")
    assert code == 2 and "unknown preset 'cheerful'; valid presets: calm," in err
    code, err = run_cli(capsys, "eval", tiny_vector_file, "--model", tiny_model_path)
    assert code == 2 and "cannot tell which preset" in err and "--preset NAME" in err


def test_cli_eval_writes_json_and_plot(capsys, tiny_vector_file, tiny_model_path, tmp_path, monkeypatch):
    import json

    # the shipped texts and prompts are slow to spell out in the tiny vocabulary: fewer, shorter ones
    monkeypatch.setattr(fluency, "load_neutral_texts", lambda: list(TEXTS))
    monkeypatch.setattr("ggsteer.cli.evaluate.load_eval_prompts", lambda name: load_eval_prompts(name)[:3])
    out_json, out_png = tmp_path / "eval.json", tmp_path / "eval.png"
    code = cli.main(["eval", str(tiny_vector_file), "--model", str(tiny_model_path), "--preset", "happy",
                     "--strengths=-1:1:3", "--layer-sweep", "--all-ranges", "--json", str(out_json),
                     "--plot", str(out_png)])
    assert code == 0
    table = capsys.readouterr().out
    assert "layers 1-2" in table and "wrong-way" in table and "perplexity" in table
    report = json.loads(out_json.read_text())
    assert report["preset"] == "happy" and report["strengths"] == [-1.0, 0.0, 1.0]
    assert [s["layers"] for s in report["sweeps"]] == [[1, 2], [1], [2]]
    zero = report["sweeps"][0]["points"][1]
    assert zero["strength"] == 0.0 and zero["kl"] == 0.0 and zero["wrong_way"] is None
    assert out_png.read_bytes()[:4] == b"\x89PNG"


# -- the default model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def happy_vector(default_model):
    return ControlVector.train(default_model, preset_dataset("happy", max_suffixes=40), method="mean_diff")


@pytest.fixture(scope="module")
def calibrated_file(happy_vector, tmp_path_factory):
    """`ggsteer calibrate` run in place on a saved happy vector; returns (path, its JSON report)."""
    import json

    folder = tmp_path_factory.mktemp("calibrate")
    path, report = folder / "happy.gguf", folder / "calibrate.json"
    happy_vector.save(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fluency, "load_neutral_texts", few_neutral_texts)
        assert cli.main(["calibrate", str(path), "--preset", "happy", "--strengths", "0.25,0.5,0.75", "--threads", "2",
                         "--json", str(report)]) == 0
    return path, json.loads(report.read_text())


def few_neutral_texts():
    """The first 5 shipped texts (120 tokens on Gemma 3: one decode per setting) keep the tests short."""
    return SHIPPED_NEUTRAL_TEXTS[:5]


SHIPPED_NEUTRAL_TEXTS = evaluate.load_neutral_texts()


@pytest.mark.default_model
def test_calibrate_writes_the_strength_generate_uses(calibrated_file, capsys):
    path, report = calibrated_file
    chosen = report["calibration"]
    # measured on all 20 neutral texts: 0.5 costs KL 0.17, 0.75 costs 0.37, over the default bound 0.25
    assert chosen["strength"] in (0.25, 0.5) and chosen["kl"] <= chosen["max_kl"] and chosen["gain"] > 1.0
    saved = ControlVector.load(path)
    assert saved.recommended_strength == pytest.approx(chosen["strength"])
    assert saved.recommended_layers == chosen["layers"] == list(range(3, 15))
    ((_, _, strength),) = load_vectors([str(path)])
    assert strength == saved.recommended_strength
    assert cli.main(["generate", "-v", str(path), "-p", "Today I feel", "-n", "2", "--threads", "2"]) == 0
    capsys.readouterr()


@pytest.mark.default_model
def test_behaviour_rises_and_kl_grows_over_the_calibrated_range(default_model, happy_vector, calibrated_file):
    top = calibrated_file[1]["calibration"]["strength"]
    strengths = [-top, -top / 2, 0.0, top / 2, top]
    sweep = strength_sweep(default_model, happy_vector, strengths, load_eval_prompts("happy"),
                           neutral_texts=few_neutral_texts())
    behaviour, kl = sweep.column("behaviour"), sweep.column("kl")
    assert np.all(np.diff(behaviour) > 0), behaviour
    assert behaviour[-1] > sweep.baseline_behaviour + 3 and behaviour[0] < sweep.baseline_behaviour - 3
    # strength 0 adds zeros, but side by side the plain and the zero-strength copy of a text sit in
    # different rows of a decode, and quantized CPU matmuls round rows by their place in the batch
    # (measured: ~4e-4 nats, against 0.05 at half the calibrated strength)
    assert 0 <= kl[2] < 0.1 * min(kl[1], kl[3]), kl
    assert behaviour[2] == pytest.approx(sweep.baseline_behaviour, abs=0.05)
    assert kl[0] > kl[1] > 0 and kl[4] > kl[3] > 0, kl
    assert sweep.steerability > 0
    assert max(p.wrong_way for p in sweep.points if p.wrong_way is not None) <= 0.25


def test_cli_eval_ablation_view_reports_what_the_ops_cost(capsys, tiny_model, tiny_vector_file, tiny_model_path,
                                                          monkeypatch):
    monkeypatch.setattr(fluency, "load_neutral_texts", lambda: list(TEXTS))
    monkeypatch.setattr("ggsteer.cli.evaluate.load_eval_prompts", lambda name: load_eval_prompts(name)[:3])
    seen = []  # the model the command loads
    real_view = evaluate.ablation.ablation_view

    def recording_view(model, *args, **kwargs):
        seen.append(model)
        return real_view(model, *args, **kwargs)

    monkeypatch.setattr("ggsteer.cli.evaluate.ablation_view", recording_view)
    code = cli.main(["eval", str(tiny_vector_file), "--model", str(tiny_model_path), "--preset", "happy",
                     "--strengths", "0", "--ablation"])
    assert code == 0
    out = capsys.readouterr().out
    assert "steerability unknown (it needs two different strengths)" in out  # one strength: no slope, not "+nan"
    rows = {line.split()[0] + ("" if line.startswith("ablate") else line.split()[1]): line.split()
            for line in out.splitlines() if line.startswith(("ablate", "clamp"))}
    assert sorted(rows) == ["ablate", "clamp+1", "clamp-1"]
    vector = ControlVector.load(tiny_vector_file)
    with tiny_model.steer(vector, 0.0, op="ablate"):
        expected_kl = fluency.fluency_cost(tiny_model).kl
    assert float(rows["ablate"][1]) == pytest.approx(expected_kl, abs=1e-3)
    assert float(rows["clamp+1"][1]) > 0
    # the opposite side: prompts behind the negative persona, unsteered (column asking-) and ablated,
    # measured again on the model the command loaded (its KV cache type differs from tiny_model's)
    from ggsteer.evaluate import behaviour_scores
    from ggsteer.evaluate.ablation import asking_items

    cli_model = seen[0]
    items = load_eval_prompts("happy")[:3]
    asking = asking_items("happy", items)
    opposite = asking_items("happy", items, side="negative")
    # every negative persona before every prompt, persona by persona
    assert [item["prompt"].split(" person. ")[0] for item in opposite] == [
        f"Act as if you are an extremely {persona}" for persona in ("sad", "depressed", "gloomy") for _ in items]
    assert [item["prompt"].split(" person. ")[1] for item in opposite] == [item["prompt"] for item in items] * 3
    with cli_model.unsteered():
        unsteered = float(behaviour_scores(cli_model, opposite).mean())
        asked = float(behaviour_scores(cli_model, asking).mean())
    with cli_model.steer(vector, 0.0, op="ablate"):
        ablated = float(behaviour_scores(cli_model, opposite).mean())
        plain = float(behaviour_scores(cli_model, items).mean())
        asked_ablated = float(behaviour_scores(cli_model, asking).mean())
    assert len(rows["ablate"]) == 12
    assert float(rows["ablate"][3]) == pytest.approx(plain, abs=2e-3)
    assert float(rows["ablate"][7]) == pytest.approx(unsteered, abs=2e-3)
    assert float(rows["ablate"][8]) == pytest.approx(ablated, abs=2e-3)
    assert float(rows["ablate"][10]) == pytest.approx((asked_ablated - ablated) / (asked - unsteered), abs=5e-3)


def test_asking_items_refuse_an_unknown_side():
    from ggsteer.evaluate.ablation import asking_items

    with pytest.raises(ValueError, match="side must be 'positive' or 'negative', got 'neutral'"):
        asking_items("happy", load_eval_prompts("happy")[:1], side="neutral")
