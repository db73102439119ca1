"""`ggsteer tune`'s report at equal KL (the default's strength scaled to the tuned KL) and its last
pass aimed at the budget's edge, on planted measurements."""

import numpy as np
import pytest

from ggsteer.evaluate import tune as tune_module
from ggsteer.evaluate import tune_report
from ggsteer.evaluate.tune import Setting, Trial


def test_the_report_compares_the_default_at_the_tuned_kl():
    """KL = 0.2 s^2 for the default's structure: the tuned settings sit at KL 0.2 (strength 1 for the
    default), the calibrated default at strength 0.5 (KL 0.05). Moves grow as the strength."""
    default, chosen = Setting("add", "all", (1, 2), 0.5), Setting("clamp", "all", (2,), 0.8)
    calls = []

    def fake(settings):
        calls.append(list(settings))
        moves = [np.array([1.0, 3.0]) * (1.3 if s == chosen else s.strength) for s in settings]
        return np.array(moves), np.array([0.2 if s == chosen else 0.2 * s.strength**2 for s in settings])

    result = tune_report.report(fake, default, chosen, seed=0)
    assert calls[0] == [default, chosen] and len(calls) >= 2
    assert result.tuned_kl == 0.2 and result.default_kl == pytest.approx(0.05)
    assert result.matched_kl == pytest.approx(0.2, rel=tune_report.MATCH_TOLERANCE)
    assert result.matched_strength == pytest.approx(1.0, rel=tune_report.MATCH_TOLERANCE)
    assert result.matched_move == pytest.approx(2.0 * result.matched_strength)
    assert result.ratio == pytest.approx(1.3 / result.matched_strength)  # at equal KL: 1.3, not 2.6
    assert result.calibrated_ratio == pytest.approx(2.6)
    assert result.ratio_spread[0] <= result.ratio <= result.ratio_spread[1]


def test_the_report_keeps_the_calibrated_default_when_no_strength_moves_its_kl():
    default, chosen = Setting("add", "all", (1,), 0.5), Setting("add", "all", (2,), 0.5)

    def fake(settings):
        return np.array([np.array([1.0, 2.0]) * (2 if s == chosen else 1) for s in settings]), np.array(
            [0.1 if s == chosen else 0.0 for s in settings])

    result = tune_report.report(fake, default, chosen, seed=0)
    assert result.matched_strength == 0.5 and result.matched_kl == 0.0 and result.ratio == pytest.approx(2.0)


def test_the_last_pass_aims_the_most_efficient_structures_at_the_budget():
    """Ranked by move / sqrt(KL), not by move: a window that moved little at a small strength beats
    one that moved more using the whole budget; each is aimed at the budget by KL ~ strength^2."""
    default = Trial(Setting("add", "all", (1, 2), 0.5), 1.0, 0.05, 0)  # 4.5 per sqrt(KL)
    efficient = Trial(Setting("add", "all", (3, 4), 0.2), 1.0, 0.01, 1)  # 10 per sqrt(KL)
    greedy = Trial(Setting("clamp", "all", (1, 2, 3, 4, 5), 1.0), 2.0, 0.24, 2)  # 4.1 per sqrt(KL)
    wrong_way = Trial(Setting("add", "all", (5,), 0.1), -1.0, 0.001, 3)
    edge = tune_module.EDGE_MARGIN * 0.25
    settings = tune_module._at_the_edge([default, efficient, greedy, wrong_way], 0.25, 2, 2.0)
    assert settings == [Setting("add", "all", (3, 4), round(0.2 * (edge / 0.01) ** 0.5, 4)),
                        Setting("add", "all", (1, 2), round(0.5 * (edge / 0.05) ** 0.5, 4))]
    # two strengths of one structure: the exponent is measured between them (KL ~ strength here)
    linear = [Trial(Setting("add", "all", (3,), 0.5), 1.0, 0.05, 1),
              Trial(Setting("add", "all", (3,), 1.0), 2.0, 0.1, 2)]
    assert tune_module._at_the_edge(linear, 0.25, 1, 5.0) == [Setting("add", "all", (3,), round(edge / 0.1, 4))]


def test_the_cli_warns_when_the_report_prompts_disagree_with_the_search(capsys):
    from ggsteer.cli.tune import print_result
    from ggsteer.evaluate.tune import TuneResult

    default = Trial(Setting("add", "all", (1, 2), 0.5), 1.0, 0.1, 0)
    chosen = Trial(Setting("clamp", "all", (2,), 1.0), 2.0, 0.2, 1)
    for tuned, warned in (([0.5, 0.7], True), ([2.0, 3.0], False)):
        report = tune_report.Report([1.0, 1.0], tuned, 0.1, 0.2, 0.7, [1.2, 1.4], 0.2, 1.0, (0.9, 1.1), 1.0)
        print_result(TuneResult(default, [default, chosen], 0.25, chosen=chosen, report=report), "happy")
        out = capsys.readouterr().out
        assert ("warning: on the report prompts" in out) is warned
        assert "ratio tuned / default at equal KL 1.00" in out and "strength 0.7" in out


def test_one_power_law_step_for_calibration_and_the_report():
    """KL = 0.1 s^3: two points give the exponent and the exact strength; one point assumes KL ~ s^2;
    a flat or steep secant is kept within KL_EXPONENT_RANGE (calibrate's search and tune share it)."""
    from ggsteer.evaluate.calibration import KL_EXPONENT_RANGE, power_law_strength

    def kl(s):
        return 0.1 * s**3

    assert power_law_strength((0.5, kl(0.5)), (1.0, kl(1.0)), 0.8) == pytest.approx(2.0)
    assert power_law_strength((1.0, 0.1), None, 0.4) == pytest.approx(2.0)  # squared: 4x the KL at 2x
    low, high = KL_EXPONENT_RANGE
    assert power_law_strength((1.0, 0.1), (2.0, 0.1001), 0.4) == pytest.approx(4.0 ** (1 / low))
    assert power_law_strength((1.0, 0.1), (2.0, 1e4), 0.4) == pytest.approx(4.0 ** (1 / high))
    assert tune_report.next_strength([(0.5, kl(0.5), None), (1.0, kl(1.0), None)], 0.8) == pytest.approx(2.0)
