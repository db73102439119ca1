"""`ggsteer generate` and `chat` refuse sampling settings without a limit or sense, in one line before the
model loads, and warn when steering is absurd or the output is not finite (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

from ggsteer.cli import main
from ggsteer.cli.main import EXIT_ERROR
from ggsteer.vectors import ControlVector


def raw_vector(path, value: float) -> str:
    ControlVector({il: np.full(48, value, np.float32) for il in (1, 2)}, "llama", {"unit": "raw"}).save(path)
    return str(path)


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("-n", "0", "-n/--max-tokens must be at least 1, got 0"),
     ("-n", "-5", "-n/--max-tokens must be at least 1, got -5"),
     ("--temp", "-1", "--temp must be between 0 (greedy) and 2, got -1"), ("--temp", "nan", "--temp must be"),
     ("--temp", "7", "--temp must be"), ("--repeat-penalty", "0", "--repeat-penalty must be a positive number")],
)
def test_bad_sampling_settings_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, command, option,
                                                                   value, message):
    import ggsteer.cli.chat
    import ggsteer.cli.generate

    def load_model(args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ggsteer.cli.generate, "load_model", load_model)
    monkeypatch.setattr(ggsteer.cli.chat, "load_model", load_model)
    vector = raw_vector(tmp_path / "v.gguf", 0.1)
    argv = [command, "--model", str(tmp_path / "none.gguf"), "--vector", vector, option, value]
    if command == "generate":
        argv += ["-p", "hi"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ggsteer: error: {message}")


def test_a_vector_of_huge_values_warns(tmp_path, tiny_model_path, capsys, monkeypatch):
    monkeypatch.setenv("GGSTEER_ALLOW_LARGE_VECTORS", "1")  # loading it at all takes the override
    vector = raw_vector(tmp_path / "huge.gguf", 1e30)
    code = main(["generate", "--model", str(tiny_model_path), "--vector", f"{vector}:2", "--raw", "-p", "the cat",
                 "-n", "4", "--threads", "2"])
    assert code == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ggsteer: warning:")]
    assert warnings == [("ggsteer: warning: huge at strength 2 adds values up to 2e+30 to the residual stream "
                         "(a model's own stay far below 1e+06): expect meaningless output")]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_non_finite_output_is_an_error(tmp_path, tiny_model_path, capsys, monkeypatch):
    monkeypatch.setenv("GGSTEER_ALLOW_LARGE_VECTORS", "1")  # loading it at all takes the override
    vector = raw_vector(tmp_path / "overflow.gguf", 3e38)  # times 2 overflows float32: the residual is inf, logits NaN
    assert main(["generate", "--model", str(tiny_model_path), "--vector", f"{vector}:2", "--raw", "-p", "the cat",
                 "-n", "4", "--threads", "2"]) == EXIT_ERROR
    error = capsys.readouterr().err.splitlines()
    assert error[-1] == ("ggsteer: error: prompt 0: the model's logits for this sequence hold NaN or Inf "
                         "(its steering is too strong)")


def test_sane_steering_does_not_warn(tmp_path, tiny_model_path, capsys):
    vector = raw_vector(tmp_path / "small.gguf", 0.05)
    assert main(["generate", "--model", str(tiny_model_path), "--vector", f"{vector}:1", "--raw", "-p", "the cat",
                 "-n", "4", "--threads", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_every_steering_option_of_the_cli_reaches_the_steering(tmp_path, tiny_model_path, capsys):
    """--first-k, --skip-first and --condition (made from steering/options.py) act on the text: each
    limit that excludes nothing gives the steered text, each that excludes everything the plain one."""
    rng = np.random.default_rng(3)
    path = tmp_path / "v.gguf"
    directions = {il: rng.normal(size=48).astype(np.float32) * 4 for il in (1, 2)}
    ControlVector(directions, "llama", {"unit": "raw"}).save(path)

    def text(*extra, layers: str = "1-2") -> str:
        argv = ["generate", "--model", str(tiny_model_path), "-p", "the cat", "-n", "6", "--temp", "0",
                "--repeat-penalty", "1", "--threads", "2", "--raw", "--layers", layers, *extra]
        assert main(argv) == 0
        return capsys.readouterr().out

    vector = ("--vector", f"{path}:0.7")
    plain, steered = text("--vector", f"{path}:0"), text(*vector)
    assert steered != plain
    assert text(*vector, "--first-k", "1000") == steered
    assert text(*vector, "--skip-first", "1000") == plain
    assert text(*vector, "--first-k", "1") not in (plain, steered)
    # the condition reads layer 1, so only layer 2 is steered
    steered_2 = text(*vector, layers="2")
    assert steered_2 != plain
    assert text(*vector, "--condition", f"{path}:-1:1", layers="2") == steered_2  # every cosine is >= -1
    assert text(*vector, "--condition", f"{path}:1:1", layers="2") == plain  # no prompt's mean state is parallel
