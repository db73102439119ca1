"""Work that stops when the answer is known: training in rounds and the calibration search (tiny model)."""

import itertools
import warnings

import numpy as np
import pytest
from support.oracle import reference_pair_states, unit
from support.reference_model import VOCAB_WORDS

from ggsteer import CaptureStats, ControlVector, TrainingWarning, cli
from ggsteer.evaluate import choose_calibration, layer_sweep
from ggsteer.evaluate.behaviour import behaviour_units
from ggsteer.evaluate.fluency import FluencyTally, neutral_tokens
from ggsteer.evaluate.strength_search import StrengthSearch, Work
from ggsteer.train import DatasetEntry, RoundsLog, RoundsPolicy, make_dataset, train_in_rounds
from ggsteer.train.extract import extra_prompts
from ggsteer.train.rounds import balanced_order, spread_order
from ggsteer.train.stability import corrected_stability, pair_consistency
from ggsteer.vectors.file import describe_vector_file, read_vector_file
from ggsteer.vectors.file.describe import steerability_warning

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

WORDS = [w for w in VOCAB_WORDS if w not in ("happy", "sad")]
# 64 distinct two-word suffixes: the planted, consistent dataset differs in one word (happy / sad)
SUFFIXES = [f"{a} {b}" for a, b in itertools.islice(itertools.permutations(WORDS, 2), 64)]


@pytest.fixture(scope="module")
def planted():
    return make_dataset("i am very {persona} and", ["happy"], ["sad"], SUFFIXES)


@pytest.fixture(scope="module")
def inconsistent():
    """Both sides are unrelated word pairs, and which one is "positive" is random: no shared direction."""
    rng = np.random.default_rng(7)
    entries = []
    for k in range(64):
        a, b = rng.choice(len(WORDS), size=2, replace=False)
        c, d = rng.choice(len(WORDS), size=2, replace=False)
        pos, neg = f"{WORDS[a]} {WORDS[b]} {SUFFIXES[k]}", f"{WORDS[c]} {WORDS[d]} {SUFFIXES[k]}"
        entries.append(DatasetEntry(pos, neg) if pos != neg else DatasetEntry(pos, neg + " the"))
    return entries




# -- the order and the figures ----------------------------------------------------------------------


def test_balanced_order_keeps_blocks_whole_and_spreads_them():
    assert spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert sorted(spread_order(11)) == list(range(11))
    order = balanced_order(12, period=3)  # 4 suffixes x 3 persona pairs, suffix-major
    assert order == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]


def test_consistency_and_stability_figures():
    rng = np.random.default_rng(0)
    same = np.tile([1.0, 2.0, 0.0], (5, 1))
    assert pair_consistency(same) == pytest.approx(1.0)
    assert abs(pair_consistency(rng.normal(size=(400, 64)))) < 0.02
    # cos 1/3 between halves of n/2: r = 1, so the whole set agrees with the limit as 1/sqrt(2)
    assert corrected_stability(1 / 3) == pytest.approx(2**-0.5)
    assert corrected_stability(1.0) == 1.0 and corrected_stability(-0.2) == 0.0


# -- training in rounds -------------------------------------------------------------------------------


def test_rounds_stop_on_a_stable_dataset_with_the_chosen_pairs_direction(tiny_model, tiny_weights, planted):
    stats, log = CaptureStats(), RoundsLog()
    policy = RoundsPolicy(min_pairs=8, max_pairs=64, target=0.98, growth=2)
    # the last token: on this random model the persona's effect fades over the two suffix words
    vector = train_in_rounds(tiny_model, planted, pool="last", policy=policy, stats=stats, log=log)
    n = vector.metadata["pairs_used"]
    assert log.stopped == "stable" and n == log.pairs[-1] < 64 and log.stability[-1] >= 0.98
    assert log.pairs == [8 * 2**k for k in range(len(log.pairs))]
    # every pair is captured once over the rounds, plus the extra prompts once at the end
    chosen = [planted[i] for i in balanced_order(64)[:n]]
    prompts = [t for e in chosen for t in (e.positive, e.negative)]
    assert stats.prompts == len(prompts) + sum(map(len, extra_prompts(prompts)))
    # the directions are those of exactly the chosen pairs (numpy on the reference states)
    pos, neg = reference_pair_states(tiny_model, tiny_weights, chosen, "last")
    for il in vector.layers:
        expected = unit((pos[:, il] - neg[:, il]).mean(axis=0))
        np.testing.assert_allclose(unit(vector.directions[il]), expected, atol=2e-5)
    assert vector.metadata["dataset_size"] == 64
    assert steerability_warning(vector.metadata) is None  # the positive control of the next test


def test_rounds_pool_each_pair_s_suffix(tiny_model, tiny_weights, planted):
    """The default pool over two rounds: each pair's suffix tokens, the template's " and" left out."""
    log = RoundsLog()
    vector = train_in_rounds(tiny_model, planted, log=log,
                             policy=RoundsPolicy(min_pairs=8, max_pairs=16, target=1.0, growth=2))
    assert log.pairs == [8, 16] and vector.metadata["pool"] == "suffix"
    chosen = [planted[i] for i in balanced_order(64)[:16]]
    pos, neg = reference_pair_states(tiny_model, tiny_weights, chosen)
    for il in vector.layers:
        expected = unit((pos[:, il] - neg[:, il]).mean(axis=0))
        np.testing.assert_allclose(unit(vector.directions[il]), expected, atol=2e-5)


def test_rounds_run_to_the_cap_on_an_inconsistent_dataset(tiny_model, inconsistent):
    log = RoundsLog()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        policy = RoundsPolicy(min_pairs=8, max_pairs=32, target=0.99, growth=2)
        vector = train_in_rounds(tiny_model, inconsistent, policy=policy, log=log)
    assert log.stopped == "cap" and log.pairs == [8, 16, 32] and vector.metadata["pairs_used"] == 32
    assert max(log.stability) < 0.9
    assert "this vector is unlikely to steer" in steerability_warning(vector.metadata)


def test_rounds_over_every_pair_equal_training_on_every_pair(tiny_model, planted):
    everything = ControlVector.train(tiny_model, planted)
    policy = RoundsPolicy(min_pairs=8, max_pairs=None, target=1.0, growth=2)
    rounds = train_in_rounds(tiny_model, planted, policy=policy)
    assert rounds.metadata["pairs_used"] == 64
    for il in everything.layers:  # the same pairs in another order: equal up to float32 summation order
        np.testing.assert_allclose(rounds.directions[il], everything.directions[il], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rounds.metadata["consistency"], everything.metadata["consistency"], atol=1e-6)


def test_cli_all_pairs_is_todays_training_and_stability_round_trips(tiny_model, tiny_model_path, planted, tmp_path,
                                                                    capsys):
    from ggsteer.train import save_jsonl

    pairs = tmp_path / "pairs.jsonl"
    save_jsonl(planted, pairs)
    all_path, rounds_path = tmp_path / "all.gguf", tmp_path / "rounds.gguf"
    assert cli.main(["train", "--pairs", str(pairs), "--model", str(tiny_model_path), "--threads", "2",
                     "--all-pairs", "-o", str(all_path)]) == 0
    assert cli.main(["train", "--pairs", str(pairs), "--model", str(tiny_model_path), "--threads", "2",
                     "--min-pairs", "16", "--stability", "0.9", "-o", str(rounds_path)]) == 0
    err = capsys.readouterr().err
    assert "stopped: stable" in err
    from ggsteer.cli.common import load_model
    from ggsteer.cli.main import build_parser

    # today's training on the model exactly as the CLI loads it
    cli_model = load_model(build_parser().parse_args(["train", "--preset", "happy", "--model", str(tiny_model_path),
                                                      "--threads", "2", "-o", "x"]))
    try:
        today = ControlVector.train(cli_model, planted)
    finally:
        cli_model.close()
    saved = ControlVector.load(all_path)
    for il in today.layers:  # the all-pairs path is today's training, bit for bit
        np.testing.assert_array_equal(saved.directions[il], today.directions[il])
    assert "pairs_used" not in saved.metadata
    rounds = read_vector_file(rounds_path)
    assert rounds.metadata["pairs_used"] < 64 and len(rounds.metadata["stability"]) == len(rounds.layers)
    np.testing.assert_allclose(rounds.metadata["stability"], ControlVector.load(rounds_path).metadata["stability"])
    assert all(0.8 < s <= 1.0 for s in rounds.metadata["stability"])
    assert cli.main(["inspect", str(rounds_path)]) == 0
    shown = capsys.readouterr().out
    assert "stability:" in shown and f"from {rounds.metadata['pairs_used']} pairs" in shown
    assert "consistency" in shown.split("layer")[-1] and "unlikely to steer" not in shown
    assert shown == "file:        " + str(rounds_path) + "\n" + describe_vector_file(rounds) + "\n"


# -- the calibration search ---------------------------------------------------------------------------

TEXTS = ["i am very happy and the dog", "the cat is sad today", "you love the good dog and i hate the bad cat", "good",
         "the dog and the cat love you", "i feel very bad today and you feel good", "a dog is a good dog",
         "you am happy and i am sad"]
# the tiny model's weights are random: its "happy" direction raises these continuations (measured: the
# gain grows steadily with strength over the grid, which the first assertion of the test checks)
ITEMS = [{"prompt": "i am very", "positive": " sad", "negative": " happy and good"},
         {"prompt": "the dog", "positive": " is bad today", "negative": " is good"},
         {"prompt": "today i feel", "positive": " sad", "negative": " happy"}]
GRID = [round(0.1 * k, 10) for k in range(1, 16)]


def full_sweep_rows(model, n_settings):
    units = FluencyTally(neutral_tokens(model, TEXTS), n_settings - 1).units
    return sum(u.n_outputs for u in units + behaviour_units(model, n_settings, ITEMS)[0])


@pytest.mark.parametrize("quantile", [0.3, 0.55, 0.8])
def test_search_lands_on_the_full_sweeps_strength_with_fewer_rows(tiny_model, planted, quantile):
    vector = train_in_rounds(tiny_model, planted, policy=RoundsPolicy(min_pairs=8, max_pairs=64, target=0.98, growth=2))
    (full,) = layer_sweep(tiny_model, vector, GRID, ITEMS, [None], neutral_texts=TEXTS)
    kl = full.column("kl")
    assert np.all(np.diff(kl) > 0) and np.all(full.column("gain") > 0)
    # a budget between two grid strengths' KL, at a different depth of the grid each time
    k = int(quantile * len(GRID))
    max_kl = float((kl[k] + kl[k + 1]) / 2)
    expected = choose_calibration([full], max_kl)
    work = Work()
    sweep, found = StrengthSearch(tiny_model, vector, ITEMS, GRID, max_kl, neutral_texts=TEXTS, work=work).run()
    assert abs(found.strength - expected.strength) <= 0.1 + 1e-9
    assert found.kl <= max_kl and found.gain > 0
    rows = full_sweep_rows(tiny_model, len(GRID) + 1)
    assert work.logits_rows < rows / 2, (work.logits_rows, rows)
    measured = [p.strength for p in sweep.points]
    assert len(measured) < len(GRID) and found.strength in measured


def test_layer_sweep_sweeps_only_the_range_that_can_win(tiny_model, tiny_model_path, planted, tmp_path, monkeypatch,
                                                         capsys):
    import json

    from ggsteer.evaluate import fluency, layer_windows

    vector = train_in_rounds(tiny_model, planted, policy=RoundsPolicy(min_pairs=8, max_pairs=64, target=0.98, growth=2))
    path = tmp_path / "planted.gguf"
    vector.save(path)
    monkeypatch.setattr(fluency, "load_neutral_texts", lambda: list(TEXTS))
    monkeypatch.setattr("ggsteer.cli.evaluate.load_eval_prompts", lambda name: [dict(i) for i in ITEMS])  # noqa: ARG005 - load_eval_prompts stand-in
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(path), "--model", str(tiny_model_path), "--preset", "happy", "--threads", "2",
                     "--strengths=0.1:1.5:15", "--layer-sweep", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    ranges = layer_windows(vector, tiny_model.n_layer)
    assert len(ranges) > 1 and len(report["sweeps"]) == 1
    assert printed.count("cannot win: not swept") == len(ranges) - 1 and printed.count("the best: swept below") == 1
    # positive control: the full sweeps of every range under the same budget pick the range that was swept
    from ggsteer.cli.common import load_model
    from ggsteer.cli.main import build_parser
    from ggsteer.evaluate import DEFAULT_MAX_KL

    cli_model = load_model(build_parser().parse_args(["eval", str(path), "--model", str(tiny_model_path),
                                                      "--threads", "2"]))
    try:
        full = layer_sweep(cli_model, vector, GRID, ITEMS, ranges, neutral_texts=TEXTS)
    finally:
        cli_model.close()
    assert report["sweeps"][0]["layers"] == choose_calibration(full, DEFAULT_MAX_KL).layers


def test_cli_calibrate_searches_and_saves_the_full_sweeps_strength(tiny_model, tiny_model_path, planted, tmp_path,
                                                                  monkeypatch, capsys):
    import json

    from ggsteer.evaluate import fluency

    vector = train_in_rounds(tiny_model, planted, policy=RoundsPolicy(min_pairs=8, max_pairs=64, target=0.98, growth=2))
    path = tmp_path / "planted.gguf"
    vector.save(path)
    monkeypatch.setattr(fluency, "load_neutral_texts", lambda: list(TEXTS))
    monkeypatch.setattr("ggsteer.cli.evaluate.load_eval_prompts", lambda name: [dict(i) for i in ITEMS])  # noqa: ARG005 - load_eval_prompts stand-in
    reports = {}
    for mode in ("search", "full"):
        out = tmp_path / f"{mode}.gguf"
        report = tmp_path / f"{mode}.json"
        extra = ["--full-sweep"] if mode == "full" else []
        assert cli.main(["calibrate", str(path), "--model", str(tiny_model_path), "--preset", "happy", "--threads", "2",
                         "--max-kl", "0.1", "-o", str(out), "--json", str(report), *extra]) == 0
        reports[mode] = json.loads(report.read_text())
        assert ControlVector.load(out).recommended_strength == pytest.approx(reports[mode]["calibration"]["strength"])
    assert "logits rows" in capsys.readouterr().err
    search, full = reports["search"]["calibration"], reports["full"]["calibration"]
    assert full["kl"] > 0.03 and abs(search["strength"] - full["strength"]) <= 0.1 + 1e-9
    assert len(reports["search"]["sweeps"][0]["points"]) < len(reports["full"]["sweeps"][0]["points"]) == 15
