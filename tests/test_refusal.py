"""Refusal steering's measurement: the phrase judge on fixed strings, the shipped request sets, the
threshold choice, and the report's numbers against direct measurement on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.models import TIGHT_LLAMA_KWARGS

from ggsteer import SteeredModel
from ggsteer.evaluate import refusal_judge
from ggsteer.evaluate.fluency import fluency_cost
from ggsteer.evaluate.refusal import (
    choose_threshold,
    condition_cosines,
    fit_condition,
    generate_replies,
    is_refusal,
    load_refusal_requests,
    refusal_rate,
    refusal_report,
)
from ggsteer.train import get_preset, load_eval_prompts
from ggsteer.vectors import ControlVector

# -- the judge ------------------------------------------------------------------------------

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for breaking into a house.",
    "As an AI language model, I must point out that this is illegal and dangerous.",
    "Sorry, but stealing a car is against the law. Instead, consider...",
    "I can\u2019t assist with hacking into accounts.",  # a typographic apostrophe
    "  I WON'T write a threatening letter.",
    "That request is unethical, so I will not write it.",
]
COMPLIANT = [
    "Sure! Here is a simple recipe for bread: mix flour, water, yeast and salt.",
    "I'm sorry to hear about your ankle. Here's how to help: rest, ice, compression and elevation.",
    "To change a tyre, loosen the nuts, lift the car with the jack and swap the wheel. " * 3
    + "Note that driving on a flat is illegal in some places.",  # a refusal word only past the opening
    "Of course. First, pick the lock with a tension wrench, then turn the cylinder.",
    "",
]


@pytest.mark.parametrize("reply", REFUSALS)
def test_the_judge_calls_refusals_refusals(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", COMPLIANT)
def test_the_judge_calls_compliance_compliance(reply):
    assert not is_refusal(reply)


def test_refusal_rate_is_the_share_of_refusals():
    assert refusal_rate(REFUSALS[:3] + COMPLIANT[:1]) == 0.75
    assert refusal_rate(COMPLIANT) == 0.0
    with pytest.raises(ValueError, match="no replies"):
        refusal_rate([])


def test_the_judge_shares_no_code_with_the_steering():
    import ast
    import inspect

    from ggsteer.evaluate import refusal_judge

    tree = ast.parse(inspect.getsource(refusal_judge))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert sorted(imported) == ["__future__", "re", "typing"]


# -- the request sets and the preset --------------------------------------------------------


def test_request_sets_are_paired_and_held_out():
    train, held_out = load_refusal_requests("train"), load_refusal_requests("eval")
    for harmful, harmless in (train, held_out):
        assert len(harmful) == len(harmless) == 16
        assert len(set(harmful) | set(harmless)) == 32
    assert not (set(train[0]) | set(train[1])) & (set(held_out[0]) | set(held_out[1]))
    with pytest.raises(ValueError, match="unknown refusal split 'test'"):
        load_refusal_requests("test")


def test_the_refusal_preset_contrasts_refusing_and_complying():
    preset = get_preset("refusal")
    assert preset.positive_personas == ("refuses", "declines", "rejects")
    assert "{persona}" in preset.template and "assistant" in preset.template
    items = load_eval_prompts("refusal")
    assert len(items) >= 12 and all(is_refusal(item["positive"]) for item in items)
    assert not any(is_refusal(item["negative"]) for item in items)


def test_threshold_separates_the_two_sets():
    assert choose_threshold(np.array([0.5, 0.6, 0.7]), np.array([0.1, 0.2])) == pytest.approx(0.35)
    # one harmless outlier above every harmful request: the best split still keeps 4 of 5 right
    threshold = choose_threshold(np.array([0.5, 0.6]), np.array([0.1, 0.2, 0.9]))
    assert 0.2 < threshold <= 0.5


# -- the report against direct measurement (tiny model) -------------------------------------


@pytest.fixture(scope="module")
def roomy_tiny_model(tiny_model_path):
    model = SteeredModel(tiny_model_path, n_ctx=4096, n_batch=512, n_seq_max=16, **TIGHT_LLAMA_KWARGS)
    yield model
    model.close()


def test_report_numbers_equal_direct_measurement(roomy_tiny_model, monkeypatch):
    model = roomy_tiny_model
    rng = np.random.default_rng(3)
    vector = ControlVector({2: rng.normal(size=48).astype(np.float32)}, model_hint="llama")
    harmful, harmless = load_refusal_requests("eval")
    plain = generate_replies(model, harmful + harmless, None, 8)
    # a stand-in judge that some tiny-model replies pass, so the rates are not all zero
    marker = next(word for word in plain[0].split() if len(word) > 1)
    monkeypatch.setattr(refusal_judge, "is_refusal", lambda reply: marker in reply)
    condition = fit_condition(model, 1)
    texts = ["the cat sat on the mat and then went to sleep", "a long road runs over the hill"]
    rows = refusal_report(model, vector, 6.0, condition=condition, layers=[2], raw=True, max_tokens=8, texts=texts)
    assert [row.setting for row in rows] == ["unsteered", "steered", "conditional"]

    steered = generate_replies(model, harmful + harmless, model.intervention(vector, 6.0, layers=[2], raw=True), 8)
    fires = np.concatenate([condition_cosines(model, condition.vector, 1, requests) >= condition.threshold
                            for requests in (harmful, harmless)])
    assert 0 < fires.sum() < len(fires)  # the condition splits the requests
    conditional = [s if fire else p for s, p, fire in zip(steered, plain, fires)]
    for row, replies in zip(rows, (plain, steered, conditional)):
        assert list(row.harmful_replies + row.harmless_replies) == replies, row.setting
        assert row.harmful_rate == refusal_rate(replies[:16]) and row.harmless_rate == refusal_rate(replies[16:])
    assert steered != plain

    model.set_control(vector, 6.0, layers=[2], raw=True)
    assert rows[1].kl == pytest.approx(fluency_cost(model, texts).kl, rel=1e-6) and rows[1].kl > 0
    model.set_control(vector, 6.0, layers=[2], raw=True, condition=condition.as_tuple())
    assert rows[2].kl == pytest.approx(fluency_cost(model, texts).kl, rel=1e-6, abs=1e-9)
    model.reset_control()
    assert rows[0].kl == 0.0


def test_cli_refusal_report(roomy_tiny_model, tiny_model_path, tmp_path, capsys, monkeypatch):
    from ggsteer.cli import main

    rng = np.random.default_rng(4)
    vector = ControlVector({2: rng.normal(size=48).astype(np.float32)}, model_hint="llama")
    vector.save(tmp_path / "v.gguf")
    out = tmp_path / "refusal.json"
    args = ["eval", str(tmp_path / "v.gguf"), "--refusal", "--model", str(tiny_model_path), "--threads", "2",
            "--raw", "--layers", "2", "--max-tokens", "4", "--json", str(out)]
    assert main(args + ["--condition-layer", "2"]) == 2
    assert "--condition-layer 2 must lie in 0..1" in capsys.readouterr().err
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "condition at layer 1" in printed
    report = json.loads(out.read_text())
    assert [row["setting"] for row in report["rows"]] == ["unsteered", "steered", "conditional"]
    assert report["strength"] == 1.0 and report["layers"] == [2]
    for row in report["rows"]:
        assert f"{100 * row['harmful_rate']:.0f}%" in printed
        assert len(row["harmful_replies"]) == len(row["harmless_replies"]) == 16
