"""`ggsteer tune`: the search (planted optimum, KL budget, Ctrl-C), its measurements against the numpy
reference, the tuned settings in the file and in their consumers (steering, llama.cpp export), the CLI."""

from dataclasses import replace

import numpy as np
import pytest
from support.reference_model import reference_forward, write_tiny_llama_gguf

from ggsteer import SteeredModel, cli
from ggsteer.evaluate import fluency, strength_sweep, tune_report
from ggsteer.evaluate import tune as tune_module
from ggsteer.evaluate.tune import Setting, Trial, TuneResult, choose, measure, pareto_front, tune, tuned_vector
from ggsteer.vectors import ControlVector, VectorFileError

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

TOL = 1e-4  # log-probabilities agree with the float64 reference to well under this (test_evaluate.py)
TEXTS = ["i am very happy and the dog", "the cat is sad today", "you love the good dog and i hate the bad cat"]
ITEMS = [
    {"prompt": "i am very", "positive": " happy and good", "negative": " sad"},
    {"prompt": "the dog", "positive": " is good", "negative": " is bad today"},
    {"prompt": "you love the", "positive": " good dog", "negative": " bad cat"},
    {"prompt": "the cat is", "positive": " happy", "negative": " sad today"},
]


def random_vector(n_embd, layers, seed=0, scale=1.5, metadata=None):
    rng = np.random.default_rng(seed)
    meta = {"unit": "gap", **(metadata or {})}
    return ControlVector({il: rng.normal(size=n_embd).astype(np.float32) * scale for il in layers}, "llama", meta)


# -- measurements against the numpy reference ----------------------------------------------------


def reference_log_softmax(weights, tokens, added, first_row):
    """float64 log-softmax of the reference logits with `added[il]` added to rows >= first_row."""

    def hook(il, h):
        if il not in added:
            return h
        h = h.copy()
        h[first_row:] += added[il]
        return h

    _, logits = reference_forward(weights, tokens, kv_f16=False, block_output_hook=hook)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference_measure(model, weights, vector, setting):
    """(mean behaviour move, KL) in numpy: "generated" steers the continuation rows and every
    neutral-text row after the first."""
    added = {il: setting.strength * vector.directions[il] for il in setting.layers}
    moves = []
    for item in ITEMS:
        n_prompt = len(model.tokenize_prompt(item["prompt"]))
        first = n_prompt if setting.when == "generated" else 0
        score = {}
        for name, extra in (("plain", {}), ("steered", added)):
            gap = 0.0
            for side, sign in (("positive", 1), ("negative", -1)):
                tokens = model.tokenize_prompt(item["prompt"] + item[side])
                log_q = reference_log_softmax(weights, tokens, extra, first)
                gap += sign * sum(log_q[pos - 1, tokens[pos]] for pos in range(n_prompt, len(tokens)))
            score[name] = gap
        moves.append(score["steered"] - score["plain"])
    kls = []
    for text in TEXTS:
        tokens = model.tokenize_prompt(text)
        log_p = reference_log_softmax(weights, tokens, {}, 0)
        log_q = reference_log_softmax(weights, tokens, added, 1 if setting.when == "generated" else 0)
        kls.extend((np.exp(log_p) * (log_p - log_q)).sum(axis=1))
    return float(np.mean(moves)), float(np.mean(kls))


def test_measure_matches_reference_for_all_and_generated_tokens(tiny_model, tiny_weights):
    vector = random_vector(tiny_model.n_embd, (1, 2), seed=3)
    settings = [Setting("add", "all", (1, 2), 0.8), Setting("add", "generated", (1, 2), 0.8),
                Setting("add", "generated", (2,), -0.6)]
    neutral = fluency.neutral_tokens(tiny_model, TEXTS)
    moves, kls = measure(tiny_model, vector, settings, ITEMS, neutral)
    for k, setting in enumerate(settings):
        move, kl = reference_measure(tiny_model, tiny_weights, vector, setting)
        assert moves[k].mean() == pytest.approx(move, abs=TOL), setting
        assert kls[k] == pytest.approx(kl, abs=TOL), setting
    # gating really changes what is steered: the prompt rows are left alone under "generated"
    assert abs(moves[0].mean() - moves[1].mean()) > 1e-2 and kls[1] < kls[0]
    # and "all" is what calibration's sweep measures
    sweep = strength_sweep(tiny_model, vector, [0.8], ITEMS, layers=[1, 2], neutral_texts=TEXTS)
    assert sweep.points[0].gain == pytest.approx(moves[0].mean(), abs=TOL)
    assert sweep.points[0].kl == pytest.approx(kls[0], abs=TOL)


def test_measure_steers_each_setting_with_its_own_vector(tiny_model, tiny_weights):
    first, second = (random_vector(tiny_model.n_embd, (1, 2), seed=seed) for seed in (3, 4))
    settings = [Setting("add", "all", (1, 2), 0.8), Setting("add", "all", (1, 2), 0.8)]
    neutral = fluency.neutral_tokens(tiny_model, TEXTS)
    moves, kls = measure(tiny_model, [first, second], settings, ITEMS, neutral)
    for k, vector in enumerate((first, second)):
        move, kl = reference_measure(tiny_model, tiny_weights, vector, settings[k])
        assert moves[k].mean() == pytest.approx(move, abs=TOL) and kls[k] == pytest.approx(kl, abs=TOL)
    assert abs(kls[0] - kls[1]) > 1e-3  # two different vectors, two different costs
    with pytest.raises(ValueError, match="2 vectors for 1 settings"):
        measure(tiny_model, [first, second], settings[:1], ITEMS, neutral)


# -- the search with a behaviour score we control ------------------------------------------------

PLANTED = (3, 4)


@pytest.fixture(scope="module")
def deep_tiny_model(tmp_path_factory):
    """A tiny model with 8 blocks, so that layer windows have room (steerable layers 1..7)."""
    path = tmp_path_factory.mktemp("deep_tiny") / "tiny-8.gguf"
    write_tiny_llama_gguf(path, n_layer=8)
    model = SteeredModel(path, n_ctx=256, n_batch=128, n_seq_max=16, n_threads=1, verbose=False)
    yield model
    model.close()


def planted_measure(calls=None, interrupt_at=None):
    """A stand-in for `measure`: the gain peaks on layers 3-4 with clamp on generated tokens; KL grows
    with strength and window size. Counts calls; raises KeyboardInterrupt on call `interrupt_at`."""
    calls = calls if calls is not None else []

    def fake(model, vector, settings, items, neutral, raw=False, stride=1):
        calls.append(list(settings))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        moves, kls = [], []
        for s in settings:
            inside = len(set(s.layers) & set(PLANTED))
            outside = len(set(s.layers) - set(PLANTED))
            factor = (1.0 if s.op == "clamp" else 0.5) * (1.0 if s.when == "generated" else 0.7)
            moves.append(np.full(len(items), s.strength * (inside - 0.5 * outside) * factor))
            kls.append(0.1 * s.strength * len(s.layers))
        return np.array(moves), np.array(kls)

    return fake


def test_search_finds_the_planted_layer_window_within_the_budget(deep_tiny_model, monkeypatch):
    vector = random_vector(deep_tiny_model.n_embd, range(1, 8), metadata={"recommended_layers": [1, 2, 3, 4, 5, 6],
                                                                          "recommended_strength": 0.3})
    optimum = 0.35 * 2 * 1.25  # add on all tokens (0.5 * 0.7), layers 3-4, strength 1.25 (KL 0.25)
    found = 0
    for seed in range(8):  # TPE is a random search: several seeds, not one lucky one
        calls = []
        monkeypatch.setattr(tune_module, "measure", planted_measure(calls))
        result = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=60, ops=("add",), whens=("all",),
                      neutral_texts=TEXTS, seed=seed)
        assert result.default.setting == Setting("add", "all", (1, 2, 3, 4, 5, 6), 0.3)
        assert calls[0][0] == result.default.setting  # the default is measured first
        assert len(result.trials) == 61 and not result.interrupted
        chosen = result.chosen.setting
        found += chosen.layers == PLANTED and 0.8 * 1.25 <= chosen.strength <= 1.25
        assert result.chosen.gain >= 0.75 * optimum and result.chosen.kl <= 0.25
        assert all(t.kl <= 0.25 for t in result.front) and result.chosen in result.front
        assert any(t.kl > 0.25 for t in result.trials)  # the sampler did try beyond the budget
        assert result.chosen.gain == max(t.gain for t in result.trials if t.kl <= 0.25)
        # the report is measured on the other half of the prompts, never the scoring half, and the
        # default again at other strengths until its KL equals the chosen settings' KL
        first = calls.index([result.default.setting, chosen])
        assert first >= len(calls) - 1 - tune_report.MATCH_ROUNDS
        assert all(c == [replace(result.default.setting, strength=c[0].strength)] for c in calls[first + 1:])
        assert result.report.matched_kl == pytest.approx(result.report.tuned_kl, rel=tune_report.MATCH_TOLERANCE)
        assert len(result.report.tuned_moves) == result.n_report == 2 and result.n_score == 2
    assert found >= 6, f"the planted window at the budget's strength was found with {found} of 8 seeds"


def test_search_finds_the_planted_op_and_gating(deep_tiny_model, monkeypatch):
    monkeypatch.setattr(tune_module, "measure", planted_measure())
    vector = random_vector(deep_tiny_model.n_embd, PLANTED)
    result = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=60, neutral_texts=TEXTS)
    chosen = result.chosen.setting
    assert (chosen.layers, chosen.op, chosen.when) == (PLANTED, "clamp", "generated") and result.chosen.kl <= 0.25


def test_same_seed_same_search(deep_tiny_model, monkeypatch):
    monkeypatch.setattr(tune_module, "measure", planted_measure())
    vector = random_vector(deep_tiny_model.n_embd, range(1, 8))
    first = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=12, neutral_texts=TEXTS)
    second = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=12, neutral_texts=TEXTS)
    assert [t.setting for t in first.trials] == [t.setting for t in second.trials]


def test_ctrl_c_keeps_the_best_so_far(deep_tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(tune_module, "measure", planted_measure(calls, interrupt_at=3))
    vector = random_vector(deep_tiny_model.n_embd, range(1, 8))
    result = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=40, neutral_texts=TEXTS)
    per_pass = tune_module.CANDIDATES_PER_PASS
    assert result.interrupted and len(result.trials) == 2 * per_pass  # two passes done, the third interrupted
    assert result.trials[0].number == 0 and [t.number for t in result.trials] == list(range(2 * per_pass))
    best = choose(result.trials, 0.25)
    assert result.chosen is best
    if best is not None:  # the report still runs on the held-out prompts
        assert result.report is not None and calls[3] == [result.default.setting, best.setting]


def test_ctrl_c_before_anything_was_measured_stops_the_tune(deep_tiny_model, monkeypatch):
    monkeypatch.setattr(tune_module, "measure", planted_measure(interrupt_at=1))
    with pytest.raises(KeyboardInterrupt):
        tune(deep_tiny_model, random_vector(deep_tiny_model.n_embd, range(1, 8)), ITEMS, max_kl=0.25, budget=5,
             neutral_texts=TEXTS)


def test_a_choice_over_the_budget_on_every_position_is_brought_back_within_it(deep_tiny_model, monkeypatch):
    """The search reads every 4th position, which here reads 20% less KL than every position does:
    the chosen setting is measured again on every position and lowered to meet the budget."""
    calls = []
    planted = planted_measure(calls)

    def strided(model, vector, settings, items, neutral, raw=False, stride=1):
        moves, kls = planted(model, vector, settings, items, neutral, raw, stride)
        return moves, kls * (0.8 if stride > 1 else 1.0)

    monkeypatch.setattr(tune_module, "measure", strided)
    vector = random_vector(deep_tiny_model.n_embd, range(1, 8))
    result = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=20, ops=("add",), whens=("all",),
                  neutral_texts=TEXTS)
    over = [c for c in calls if len(c) == 2][0][1]  # the first report's chosen setting
    assert 0.25 < 0.1 * over.strength * len(over.layers) <= 0.25 / 0.8
    chosen = result.chosen
    assert chosen.setting == replace(over, strength=chosen.setting.strength) and chosen is result.trials[-1]
    assert result.report.tuned_kl == chosen.kl <= 0.25 and chosen.setting.strength < over.strength


def test_nothing_beats_the_default(deep_tiny_model, monkeypatch):
    def default_is_best(model, vector, settings, items, neutral, raw=False, stride=1):
        gains = [1.0 if s.op == "add" and s.when == "all" and s.layers == tuple(range(1, 8)) else 0.1 for s in settings]
        return np.array([np.full(len(items), g) for g in gains]), np.zeros(len(settings))

    monkeypatch.setattr(tune_module, "measure", default_is_best)
    vector = random_vector(deep_tiny_model.n_embd, range(1, 8), metadata={"recommended_layers": list(range(1, 8))})
    result = tune(deep_tiny_model, vector, ITEMS, max_kl=0.25, budget=6, ops=("clamp",), neutral_texts=TEXTS)
    assert result.chosen is None and not result.beats_default and result.report is None
    with pytest.raises(ValueError, match="nothing beat the default"):
        tuned_vector(vector, result)


def test_choose_and_front():
    s = Setting("add", "all", (1,), 1.0)
    default, a, b, c = Trial(s, 0.5, 0.1, 0), Trial(s, 0.9, 0.2, 1), Trial(s, 2.0, 0.4, 2), Trial(s, 0.7, 0.3, 3)
    assert choose([default, a, b, c], 0.25) is a
    assert choose([default, c], 0.25) is None  # c is over the budget and nothing else beats the default
    assert choose([Trial(s, 0.5, 0.5, 0), Trial(s, 0.1, 0.2, 1)], 0.25).number == 1  # the default is over budget
    assert pareto_front([default, a, b, c]) == [default, a, b]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_kl=0.0), "KL budget must be a positive"), (dict(budget=0), "at least 1 candidate"),
    (dict(ops=("ablate",)), "cannot tune op 'ablate'"), (dict(whens=("sometimes",)), "cannot tune when"),
    (dict(strength_range=(0.0, 1.0)), "0 < low <= high"),
    (dict(kl_stride=0), "KL stride must be at least 1"),
])
def test_bad_search_settings(tiny_model, kwargs, message):
    options = {"max_kl": 0.25, "budget": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        tune(tiny_model, random_vector(tiny_model.n_embd, (1, 2)), ITEMS, **options)


# -- a real search on the tiny model ---------------------------------------------------------------


def test_tune_on_the_tiny_model_measures_every_candidate(tiny_model):
    vector = random_vector(tiny_model.n_embd, (1, 2), seed=5, scale=0.5, metadata={"recommended_strength": 0.2})
    result = tune(tiny_model, vector, ITEMS, max_kl=0.05, budget=7, neutral_texts=TEXTS)
    assert len(result.trials) == 8
    neutral = fluency.neutral_tokens(tiny_model, TEXTS)
    score_items, report_items = ITEMS[0::2], ITEMS[1::2]
    # every candidate's numbers are what measuring it alone on the scoring prompts gives
    for trial in result.trials[:3]:
        moves, kls = measure(tiny_model, vector, [trial.setting], score_items, neutral, stride=4)
        assert trial.gain == pytest.approx(moves[0].mean(), abs=TOL) and trial.kl == pytest.approx(kls[0], abs=TOL)
    assert all(t.kl <= 0.05 for t in result.front)
    if result.chosen is not None:
        assert result.chosen.kl <= 0.05
        moves, kls = measure(tiny_model, vector, [result.default.setting, result.chosen.setting], report_items, neutral)
        np.testing.assert_allclose(result.report.default_moves, moves[0], atol=TOL)
        np.testing.assert_allclose(result.report.tuned_moves, moves[1], atol=TOL)
        matched = replace(result.default.setting, strength=result.report.matched_strength)
        moves, kls = measure(tiny_model, vector, [matched], report_items, neutral)
        np.testing.assert_allclose(result.report.matched_moves, moves[0], atol=TOL)
        assert result.report.matched_kl == pytest.approx(kls[0], abs=TOL)


# -- the tuned settings in the file and their consumers -------------------------------------------


def tuned_result(setting, kl=0.1):
    trial = Trial(setting, 1.0, kl, 5)
    default = Trial(Setting("add", "all", (1, 2), 0.5), 0.5, 0.05, 0)
    return TuneResult(default, [default, trial], 0.25, chosen=trial)


def test_tuned_settings_round_trip_through_the_file(tiny_model, tmp_path, capsys):
    metadata = {"recommended_strength": 0.5, "recommended_layers": [1, 2]}
    vector = random_vector(tiny_model.n_embd, (1, 2), metadata=metadata)
    path = tmp_path / "tuned.gguf"
    tuned_vector(vector, tuned_result(Setting("clamp", "generated", (2,), 0.75)), "happy").save(path)
    loaded = ControlVector.load(path)
    assert loaded.tuned == ("clamp", "generated", [2], 0.75)
    assert loaded.recommended_strength == 0.5 and loaded.recommended_layers == [1, 2]
    assert loaded.metadata["tuned_max_kl"] == 0.25 and loaded.metadata["eval_preset"] == "happy"
    assert loaded.tuned_addition is None
    assert cli.main(["inspect", str(path)]) == 0
    shown = "tuned settings:       clamp on generated tokens, layers 2, strength 0.75 (KL 0.1 <= 0.25)"
    assert shown in capsys.readouterr().out
    # steering without options uses the tuned settings; an explicit op does not
    tiny_model.set_control(loaded)
    (item,) = tiny_model.controls
    assert (item.op, item.when, item.layers, item.strength) == ("clamp", "generated", (2,), 0.75)
    tiny_model.set_control(loaded, op="add")
    (item,) = tiny_model.controls
    assert (item.op, item.when, item.layers, item.strength) == ("add", "all", (1, 2), 0.5)


def test_incomplete_or_unknown_tuned_settings_are_refused(tiny_model, tmp_path):
    vector = random_vector(tiny_model.n_embd, (1, 2), metadata={"tuned_op": "add", "tuned_strength": 0.5})
    with pytest.raises(VectorFileError, match="tuned settings are incomplete: tuned_when, tuned_layers missing"):
        vector.save(tmp_path / "a.gguf")
    vector = random_vector(tiny_model.n_embd, (1, 2), metadata={"tuned_op": "rotate", "tuned_when": "all",
                                                               "tuned_layers": [1], "tuned_strength": 0.5})
    with pytest.raises(VectorFileError, match="tuned_op is 'rotate'"):
        vector.save(tmp_path / "b.gguf")
    vector = random_vector(tiny_model.n_embd, (1, 2), metadata={"tuned_op": "add", "tuned_when": "all",
                                                               "tuned_layers": [3], "tuned_strength": 0.5})
    with pytest.raises(VectorFileError, match=r"tuned_layers has layers \[3\] that have no direction"):
        vector.save(tmp_path / "c.gguf")


def test_tuned_addition_exports_to_llama_cpp(tiny_model, tmp_path, capsys):
    vector = random_vector(tiny_model.n_embd, (1, 2), metadata={"recommended_strength": 0.5})
    path, out = tmp_path / "tuned.gguf", tmp_path / "llama.gguf"
    tuned_vector(vector, tuned_result(Setting("add", "all", (2,), 0.75))).save(path)
    assert cli.main(["export", str(path), "-o", str(out)]) == 0
    exported = ControlVector.load(out)
    assert exported.layers == [2]
    np.testing.assert_allclose(exported.directions[2], 0.75 * vector.directions[2], rtol=1e-6)
    assert "strength 0.75 baked into layers 2..2" in capsys.readouterr().out
    # an explicit op ignores the tuned settings, even when they are the same op
    tiny_model.set_control(ControlVector.load(path), op="add")
    (item,) = tiny_model.controls
    assert (item.layers, item.strength) == ((1, 2), 0.5)
    # llama.cpp adds the exported file exactly as ggsteer steers with the tuned settings
    tiny_model.set_control(ControlVector.load(path))
    steered = tiny_model.create_completion("the dog", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    tiny_model.set_control(exported, 1.0, raw=True)
    exported_text = tiny_model.create_completion("the dog", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    assert steered == exported_text


def test_export_refuses_a_tuned_op_llama_cpp_cannot_express(tiny_model, tmp_path, capsys):
    path, out = tmp_path / "tuned.gguf", tmp_path / "llama.gguf"
    setting = Setting("add_normalized", "all", (2,), 0.75)
    tuned_vector(random_vector(tiny_model.n_embd, (1, 2)), tuned_result(setting)).save(path)
    assert cli.main(["export", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tuned settings (add_normalized, all tokens) cannot be expressed by llama.cpp" in err and not out.exists()
    assert cli.main(["export", str(path), "-o", str(out), "--strength", "0.5"]) == 0
    assert "warning" in capsys.readouterr().err and out.exists()


# -- the command ------------------------------------------------------------------------------------


def test_cli_tune_writes_the_chosen_settings(tiny_model, tiny_model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fluency, "load_neutral_texts", lambda: list(TEXTS))
    monkeypatch.setattr("ggsteer.cli.tune.load_eval_prompts", lambda _name: list(ITEMS))
    path, out, png = tmp_path / "v.gguf", tmp_path / "tuned.gguf", tmp_path / "front.png"
    random_vector(tiny_model.n_embd, (1, 2), seed=5, scale=0.5, metadata={"recommended_strength": 0.2}).save(path)
    argv = ["tune", str(path), "--model", str(tiny_model_path), "--preset", "happy", "--budget", "7",
            "--max-kl", "0.05", "--threads", "1", "-o", str(out), "--plot", str(png)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "Pareto front" in text and "default: add all layers 1-2 strength 0.2" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    tuned = ControlVector.load(out).tuned
    assert tuned is not None and f"chosen:  {tuned.op} {tuned.when}" in text and "held-out report prompts" in text
    assert cli.main(argv) == 2  # an existing output needs --force
    assert "already exists: pass --force" in capsys.readouterr().err
    # eval shows the tuned settings beside the default ones
    monkeypatch.setattr("ggsteer.cli.evaluate.load_eval_prompts", lambda _name: list(ITEMS))
    assert cli.main(["eval", str(out), "--model", str(tiny_model_path), "--strengths=0,0.2", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "default settings: add all layers 1-2 strength 0.2" in text and f"tuned settings:   {tuned.op}" in text


def test_cli_tune_checks_arguments_before_loading(tiny_model, tmp_path, capsys):
    path = tmp_path / "v.gguf"
    random_vector(tiny_model.n_embd, (1, 2)).save(path)
    assert cli.main(["tune", str(path), "--max-kl", "-1"]) == 2
    assert "--max-kl must be a positive number" in capsys.readouterr().err
    assert cli.main(["tune", str(path), "--plot", "/nonexistent/x.png"]) == 2
    assert "the directory /nonexistent does not exist" in capsys.readouterr().err


def test_the_server_steers_a_tuned_vector_with_its_tuned_settings(tiny_model, tmp_path):
    from ggsteer.serve.registry import RegisteredVector, intervention_for

    path = tmp_path / "tuned.gguf"
    vector = random_vector(tiny_model.n_embd, (1, 2), metadata={"recommended_strength": 0.5})
    tuned_vector(vector, tuned_result(Setting("clamp", "generated", (2,), 0.75))).save(path)
    entry = RegisteredVector("tuned", path, ControlVector.load(path))

    def settings(spec):
        item = intervention_for(entry, spec, tiny_model)
        return item.op, item.when, item.layers, item.strength

    assert settings({}) == ("clamp", "generated", (2,), 0.75)
    assert settings(0.3) == ("clamp", "generated", (2,), 0.3)  # a strength replaces only the tuned strength
    assert settings({"op": "add"}) == ("add", "all", (1, 2), 0.5)  # an explicit op: the recommended settings
