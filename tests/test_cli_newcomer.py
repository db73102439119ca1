"""The README's path for a newcomer: missing extras and bad names fail before any model loads, the
demo's file names its preset for eval/calibrate, export needs no mode flag, every option has help."""

import argparse
import sys

import numpy as np
import pytest

from ggsteer import cli
from ggsteer.cli import demo, export, inspect
from ggsteer.cli import evaluate as cli_evaluate
from ggsteer.cli import train as cli_train
from ggsteer.vectors import ControlVector
from ggsteer.vectors.file.schema import PER_LAYER_KEYS


class ModelLoaded(Exception):
    """Raised instead of loading a model: the command got past every check that comes first."""


def refuse_model(*args, **kwargs):
    raise ModelLoaded


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def vector_file(tmp_path):
    def write(metadata=None, name="v.gguf"):
        rng = np.random.default_rng(0)
        directions = {il: rng.normal(size=48).astype(np.float32) for il in (1, 2)}
        path = tmp_path / name
        ControlVector(directions, "llama", {"unit": "gap", **(metadata or {})}).save(path)
        return path

    return write


def test_plot_without_matplotlib_fails_before_the_model_loads(capsys, monkeypatch, vector_file, tmp_path):
    monkeypatch.setattr(cli_evaluate, "load_model", refuse_model)
    path = vector_file({"eval_preset": "happy"})
    # positive control: with matplotlib importable the same command gets as far as loading the model
    with pytest.raises(ModelLoaded):
        cli.main(["eval", str(path), "--plot", str(tmp_path / "x.png")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = run(capsys, "eval", path, "--plot", tmp_path / "x.png")
    assert code == 2
    assert 'pip install "ggsteer[plot]"' in err and "--plot" in err
    assert not (tmp_path / "x.png").exists()


def test_demo_vector_records_its_preset_for_eval(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(demo, "DEMO_SUFFIXES", 4)  # 12 pairs: the record does not depend on how many
    trained, cached = demo.demo_vector(tiny_model, retrain=True)
    assert trained.metadata["eval_preset"] == "happy"
    again, _ = demo.demo_vector(tiny_model, retrain=False)  # from the cache
    assert again.metadata["eval_preset"] == "happy"
    written = demo.write_output(trained, cached, str(tmp_path / "ggsteer-happy.gguf"))
    loaded = ControlVector.load(written)
    assert cli_evaluate.named_preset(None, loaded, written) == "happy"
    # control: the same directions without the record name no preset (the hash of a subset matches none)
    bare = ControlVector(loaded.directions, loaded.model_hint,
                         {k: v for k, v in loaded.metadata.items() if k != "eval_preset"})
    assert cli_evaluate.named_preset(None, bare, written) is None


def test_eval_and_calibrate_take_the_recorded_preset_before_the_model_loads(monkeypatch, vector_file):
    monkeypatch.setattr(cli_evaluate, "load_model", refuse_model)
    path = vector_file({"eval_preset": "calm"})
    assert cli_evaluate.named_preset(None, ControlVector.load(path), path) == "calm"
    assert cli_evaluate.named_preset("happy", ControlVector.load(path), path) == "happy"  # --preset wins
    for command in ("eval", "calibrate"):
        with pytest.raises(ModelLoaded):
            cli.main([command, str(path)])


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_preset_typos_fail_before_the_model_loads(capsys, monkeypatch, vector_file, command):
    monkeypatch.setattr(cli_evaluate, "load_model", refuse_model)
    good = vector_file({"eval_preset": "happy"}, "good.gguf")
    code, _, err = run(capsys, command, good, "--preset", "hapy")
    assert code == 2 and "unknown preset 'hapy'" in err and "happy" in err
    recorded = vector_file({"eval_preset": "hapy"}, "typo.gguf")
    code, _, err = run(capsys, command, recorded)
    assert code == 2 and "typo.gguf records unknown preset 'hapy'" in err and "--preset" in err
    with pytest.raises(ModelLoaded):  # control: the right name gets to the model
        cli.main([command, str(good), "--preset", "happy"])


def test_train_preset_typo_fails_before_the_model_loads(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli_train, "load_model", refuse_model)
    code, _, err = run(capsys, "train", "--preset", "hapy", "-o", tmp_path / "x.gguf")
    assert code == 2 and "unknown preset 'hapy'" in err
    with pytest.raises(ModelLoaded):  # control
        cli.main(["train", "--preset", "happy", "-o", str(tmp_path / "x.gguf")])


def test_export_needs_no_mode_flag_and_still_accepts_it(capsys, vector_file, tmp_path):
    path = vector_file({"recommended_layers": [2]})
    code, out, _ = run(capsys, "export", path, "--strength", 0.5, "-o", tmp_path / "plain.gguf")
    assert code == 0 and "--control-vector" in out
    code, _, _ = run(capsys, "export", path, "--for-llama-cpp", "--strength", 0.5, "-o", tmp_path / "flag.gguf")
    assert code == 0
    source = ControlVector.load(path)
    for name in ("plain.gguf", "flag.gguf"):
        exported = ControlVector.load(tmp_path / name)
        assert exported.layers == [2]
        np.testing.assert_array_equal(exported.directions[2], source.directions[2] * np.float32(0.5))


def subparser(module, name) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    return parser._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("module, name", [(export, "export"), (inspect, "inspect")])
def test_every_option_has_help(module, name):
    parser = subparser(module, name)
    without = [action.dest for action in parser._actions if not action.help]
    assert without == []
    assert len(parser._actions) >= 3  # control: the parser has options to check


def test_inspect_help_explains_every_column():
    text = subparser(inspect, "inspect").format_help()
    for title in ("layer", "norm", *(key.replace("_", " ") for key in PER_LAYER_KEYS)):
        assert f"\n  {title} " in text, title


def test_every_option_of_every_command_has_help():
    from ggsteer.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    missing = {name: [a.dest for a in sub._actions if not a.help] for name, sub in commands.items()}
    assert {name: dests for name, dests in missing.items() if dests} == {}
    assert len(commands) >= 12  # control: every subcommand is looked at
