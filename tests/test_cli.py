"""The `ggsteer` command line on the tiny model: files written, outputs printed, errors reported."""

import json

import numpy as np
import pytest

from ggsteer import cli
from ggsteer.train import make_dataset, save_jsonl
from ggsteer.vectors import ControlVector

SUFFIXES = ["i feel", "the dog is", "today i", "a cat and the dog", "i love the", "good"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "pairs.jsonl"
    save_jsonl(make_dataset("i am very {persona} and", ["happy", "good"], ["sad", "bad"], SUFFIXES), path)
    return path


@pytest.fixture(scope="module")
def trained_file(tiny_model_path, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "happy.gguf"
    assert cli.main(["train", "--pairs", str(pairs_file), "--model", str(tiny_model_path), "-o", str(out),
                     "--threads", "2"]) == 0
    return out


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_writes_a_loadable_vector(trained_file):
    vector = ControlVector.load(trained_file)
    assert vector.layers == [1, 2]
    assert vector.metadata["method"] == "mean_diff"
    assert vector.metadata["dataset_size"] == 2 * len(SUFFIXES)
    assert vector.unit == "gap"


def test_train_pool_mean_is_the_library_mean_pooling(capsys, tiny_model, tiny_model_path, pairs_file, trained_file,
                                                     tmp_path):
    out = tmp_path / "mean.gguf"
    code, _, _ = run(capsys, "train", "--pairs", pairs_file, "--model", tiny_model_path, "-o", out, "--pool", "mean")
    assert code == 0
    from ggsteer.train import load_jsonl

    expected = ControlVector.train(tiny_model, load_jsonl(pairs_file), pool="mean")
    got, last = ControlVector.load(out), ControlVector.load(trained_file)
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    for il in expected.layers:
        # the CLI's context keeps its KV cache in F16, the fixture's in F32: equal up to that rounding
        assert cos(got.directions[il], expected.directions[il]) > 0.9999
        assert cos(got.directions[il], last.directions[il]) < 0.999  # not the last-token direction


def test_threads_option_sets_batch_threads_too(tiny_model_path):
    import argparse

    from ggsteer.cli.common import load_model

    model = load_model(argparse.Namespace(model=str(tiny_model_path), threads=1))
    assert (model.context_params.n_threads, model.context_params.n_threads_batch) == (1, 1)
    model.close()


def test_train_refuses_existing_output(capsys, tiny_model_path, pairs_file, trained_file):
    before = trained_file.read_bytes()
    code, _, err = run(capsys, "train", "--pairs", pairs_file, "--model", tiny_model_path, "-o", trained_file)
    assert code == 2 and "already exists" in err and "--force" in err
    assert trained_file.read_bytes() == before


def test_inspect_prints_layers_and_stats(capsys, trained_file):
    code, out, _ = run(capsys, "inspect", trained_file)
    assert code == 0
    assert "mean_diff" in out and "separation" in out
    assert "1-2" in out


def test_presets_lists_all(capsys):
    code, out, _ = run(capsys, "presets")
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert code == 0 and "happy" in names and "honest" in names and "refusal" in names and len(names) == 11


def test_generate_compare_shows_both(capsys, tiny_model_path, trained_file):
    code, out, _ = run(capsys, "generate", "--model", tiny_model_path, "--vector", f"{trained_file}:8", "--prompt",
                       "i am very", "-n", "8", "--temp", "0", "--compare", "--layers", "1-2")
    assert code == 0
    assert "--- baseline ---" in out and "--- steered (happy +8) ---" in out
    baseline = out.split("--- baseline ---")[1].split("--- steered")[0].strip()
    steered = out.split("---\n")[-1].strip()
    assert baseline != steered


def test_generate_with_ablate_and_when(capsys, tiny_model_path, trained_file):
    code, out, _ = run(capsys, "generate", "--model", tiny_model_path, "--ablate", trained_file, "--when", "generated",
                       "--prompt", "i am very", "-n", "6", "--temp", "0", "--compare")
    assert code == 0 and f"ablate {trained_file}, generated tokens only" in out


def test_export_bakes_strength(capsys, trained_file, tmp_path):
    out_path = tmp_path / "baked.gguf"
    code, out, _ = run(capsys, "export", trained_file, "--for-llama-cpp", "--strength", "0.5", "--layers", "1-2",
                       "-o", out_path)
    assert code == 0
    assert f"--control-vector-scaled {trained_file} 0.5 --control-vector-layer-range 1 2" in out
    source, baked = ControlVector.load(trained_file), ControlVector.load(out_path)
    for il in (1, 2):
        np.testing.assert_allclose(baked.directions[il], 0.5 * source.directions[il], rtol=1e-6)
    assert baked.unit == "raw"


@pytest.mark.parametrize(
    "spec, message",
    [("{f}:abc", "expected FILE or FILE:STRENGTH"), ("{f}:nan", "finite number"), (":0.5", "file name is missing")],
)
def test_malformed_vector_spec(capsys, tiny_model_path, trained_file, spec, message):
    code, _, err = run(capsys, "generate", "--model", tiny_model_path, "--vector", spec.format(f=trained_file),
                       "--prompt", "x")
    assert code == 2 and message in err


def test_vector_for_another_model(capsys, tiny_model_path, tmp_path):
    other = tmp_path / "other.gguf"
    ControlVector({1: np.ones(7, np.float32)}, "llama", {"unit": "gap"}).save(other)
    code, _, err = run(capsys, "generate", "--model", tiny_model_path, "--vector", other, "--prompt", "x")
    assert code == 2 and "n_embd 7 but the model has n_embd 48" in err


def test_unknown_preset_and_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--preset", "grumpy", "--model", tmp_path / "none.gguf",
                       "-o", tmp_path / "x.gguf")
    assert code == 2 and "unknown preset 'grumpy'" in err  # the name is checked before the model is looked for
    code, _, err = run(capsys, "train", "--preset", "happy", "--model", tmp_path / "none.gguf",
                       "-o", tmp_path / "x.gguf")
    assert code == 2 and "none.gguf" in err
    code, _, err = run(capsys, "inspect", tmp_path / "missing.gguf")
    assert code == 2 and "missing.gguf" in err


def test_unknown_preset(capsys, tiny_model_path, tmp_path):
    code, _, err = run(capsys, "train", "--preset", "grumpy", "--model", tiny_model_path, "-o", tmp_path / "x.gguf")
    assert code == 2 and "grumpy" in err and "happy" in err


def test_empty_pairs_file(capsys, tiny_model_path, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run(capsys, "train", "--pairs", empty, "--model", tiny_model_path, "-o", tmp_path / "x.gguf")
    assert code == 2 and "no pairs" in err and "empty.jsonl" in err
    assert not (tmp_path / "x.gguf").exists()


def test_chat_commands_change_steering(monkeypatch, capsys, tiny_model_path, trained_file):
    lines = iter(["/vectors", "/strength happy 3", "i am", "/strength nope 1", "/reset", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    code, out, _ = run(capsys, "chat", "--model", tiny_model_path, "--vector", f"{trained_file}:0.5", "-n", "4",
                       "--temp", "0")
    assert code == 0
    assert "happy: strength +0.5" in out
    assert "happy strength +3 from the next message" in out
    assert "bot> " in out
    assert "no vector named 'nope'" in out
    assert "steering off" in out


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("ggsteer ")
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "inspect", "generate", "chat", "export", "presets"):
        assert command in out


_ = json
