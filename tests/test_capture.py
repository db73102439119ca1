"""Captured hidden states against the numpy reference forward pass of the tiny model."""

import numpy as np
import pytest
from support.reference_model import reference_forward

import ggsteer
from ggsteer import SteeredModel

# float32 round-off: the reference runs in float64; llama.cpp accumulates float32 dot products of
# length n_embd=48..96 over 3 blocks. Residual entries are O(1), so errors are ~1e-6; 1e-4 leaves
# room while a wrong row, layer or position (errors O(1)) cannot pass.
ATOL = 1e-4

PROMPTS = [
    "the happy dog",
    "a sad cat and the happy dog went home",
    "the",
    "the happy dog ran",  # the first prompt is a token-prefix of this one
    "Zebra! 42?",
]


def reference_states(model, weights, prompt):
    tokens = model.tokenize_prompt(prompt)
    hidden, _ = reference_forward(weights, tokens, kv_f16=False)
    return hidden.transpose(1, 0, 2)  # [n_tokens, n_layer, n_embd]


def test_tokenization_matches_llama(tiny_model):
    assert tiny_model.tokenize_prompt("the happy dog") == tiny_model.tokenize(b"the happy dog")
    assert tiny_model.tokenize_prompt("the")[0] == tiny_model.token_bos()


def test_last_token_matches_reference(tiny_model, tiny_weights):
    states = tiny_model.hidden_states(PROMPTS)
    assert states.shape == (len(PROMPTS), tiny_model.n_layer, tiny_model.n_embd)
    assert states.dtype == np.float32
    for i, prompt in enumerate(PROMPTS):
        expected = reference_states(tiny_model, tiny_weights, prompt)[-1]
        np.testing.assert_allclose(states[i], expected, atol=ATOL, rtol=0)


def test_mean_and_all_match_reference(tiny_model, tiny_weights):
    means = tiny_model.hidden_states(PROMPTS, pool="mean")
    everything = tiny_model.hidden_states(PROMPTS, pool="all")
    assert isinstance(everything, list) and len(everything) == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        expected = reference_states(tiny_model, tiny_weights, prompt)
        assert everything[i].shape == expected.shape
        np.testing.assert_allclose(everything[i], expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(means[i], expected.mean(axis=0), atol=ATOL, rtol=0)


def test_layer_subset_in_requested_order(tiny_model):
    full = tiny_model.hidden_states(PROMPTS)
    subset = tiny_model.hidden_states(PROMPTS, layers=[2, 0])
    assert subset.shape == (len(PROMPTS), 2, tiny_model.n_embd)
    np.testing.assert_array_equal(subset[:, 0], full[:, 2])
    np.testing.assert_array_equal(subset[:, 1], full[:, 0])


def test_last_layer_alone(tiny_model, tiny_weights):
    # the last block holds only output rows: capture it without any other layer
    last = tiny_model.n_layer - 1
    states = tiny_model.hidden_states(PROMPTS, layers=[last], pool="all")
    for i, prompt in enumerate(PROMPTS):
        expected = reference_states(tiny_model, tiny_weights, prompt)[:, last]
        np.testing.assert_allclose(states[i][:, 0], expected, atol=ATOL, rtol=0)


class DecodeRecorder:
    """Records what each llama_decode of a capture asked llama.cpp for, read off the batch itself."""

    def __init__(self, model, monkeypatch):
        self.tokens, self.outputs = [], []
        real = model.decode_batch

        def recording(batch, *args, **kwargs):
            flags = np.ctypeslib.as_array(batch.logits, shape=(batch.n_tokens,))
            self.tokens.append(int(batch.n_tokens))
            self.outputs.append(int(np.count_nonzero(flags)))
            return real(batch, *args, **kwargs)

        monkeypatch.setattr(model, "decode_batch", recording)


@pytest.mark.parametrize("pool", ["last", "all"])
def test_every_layer_but_the_last_matches_reference(tiny_model, tiny_weights, monkeypatch, pool):
    # without the last layer no row needs to be an output: the states must still be right
    layers = list(range(tiny_model.n_layer - 1))
    recorder = DecodeRecorder(tiny_model, monkeypatch)
    states = tiny_model.hidden_states(PROMPTS, layers=layers, pool=pool)
    assert sum(recorder.outputs) == 0
    for i, prompt in enumerate(PROMPTS):
        expected = reference_states(tiny_model, tiny_weights, prompt)[:, layers]
        got = states[i] if pool == "all" else states[i][None]
        np.testing.assert_allclose(got, expected if pool == "all" else expected[-1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("pool", ["last", "all"])
def test_output_rows_only_for_the_last_layer(tiny_model, monkeypatch, pool):
    """The last layer needs its captured rows as outputs (and only those); the stats count the same."""
    recorder = DecodeRecorder(tiny_model, monkeypatch)
    stats = ggsteer.CaptureStats()
    tiny_model.hidden_states(PROMPTS, pool=pool, stats=stats)
    token_lists = [tiny_model.tokenize_prompt(p) for p in PROMPTS]
    if pool == "last":
        wanted = {tuple(tokens) for tokens in token_lists}
    else:
        wanted = {tuple(tokens[:k]) for tokens in token_lists for k in range(1, len(tokens) + 1)}
    assert sum(recorder.outputs) == len(wanted)  # one output per distinct captured prefix
    distinct_prefixes = {tuple(tokens[:k]) for tokens in token_lists for k in range(1, len(tokens) + 1)}
    assert sum(recorder.tokens) == len(distinct_prefixes)
    assert (stats.decodes, stats.tokens, stats.output_rows) == (len(recorder.tokens), sum(recorder.tokens),
                                                                 sum(recorder.outputs))
    assert stats.prompt_tokens == sum(map(len, token_lists))


def test_batches_stay_full_across_segments(tiny_weights, tiny_model_path, monkeypatch):
    """Segments that do not fit the rest of a batch are split: past the shared BOS (alone in the
    first decode: every sequence needs it first), every decode but the last is full."""
    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=16, n_seq_max=8, flash_attn=False, type_k=0, type_v=0)
    prompts = ["the happy dog and a cat", "a sad cat and the happy dog went home", "you am very good today",
               "i love the bad cat", "the happy dog ran", "Zebra! 42?", "today i feel very sad and bad"]
    recorder = DecodeRecorder(model, monkeypatch)
    states = model.hidden_states(prompts, pool="all")
    assert recorder.tokens[0] == 1
    assert recorder.tokens[1:-1] == [16] * (len(recorder.tokens) - 2) and 0 < recorder.tokens[-1] <= 16
    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(states[i], reference_states(model, tiny_weights, prompt), atol=ATOL, rtol=0)
    model.close()


def test_batched_equals_one_at_a_time(tiny_model):
    batched = tiny_model.hidden_states(PROMPTS, pool="mean")
    single = np.stack([tiny_model.hidden_states([p], pool="mean")[0] for p in PROMPTS])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_prefix_sharing_equals_full_decodes(tiny_model, batch_size):
    prompts = ([f"the {w} dog and a cat" for w in ("happy", "sad")] + [f"the {w} dog" for w in ("happy", "sad")]
               + PROMPTS)
    shared = tiny_model.hidden_states(prompts, pool="all", batch_size=batch_size)
    unshared = tiny_model.hidden_states(prompts, pool="all", batch_size=batch_size, share_prefixes=False)
    for a, b in zip(shared, unshared):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    last_three = tiny_model.hidden_states(prompts, pool=3, batch_size=batch_size, share_prefixes=False)
    np.testing.assert_allclose(last_three, np.stack([a[-3:].mean(axis=0) for a in shared]), atol=1e-5, rtol=0)


def test_prompt_longer_than_a_batch(tiny_weights, tiny_model_path):
    # 100-token prompt over n_batch=32: decoded in chunks that continue the same sequence
    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=32, n_seq_max=4, flash_attn=False, type_k=0, type_v=0)
    prompt = " ".join(["the happy dog"] * 33)
    states = model.hidden_states([prompt, "the sad cat"], pool="all")
    expected = reference_states(model, tiny_weights, prompt)
    assert len(expected) > 32
    np.testing.assert_allclose(states[0], expected, atol=ATOL, rtol=0)
    model.close()


def test_graph_ends_at_the_deepest_captured_layer(tiny_weights, tiny_model_path):
    """Nobody reads a capture's logits, so each decode ends right after the deepest captured l_out
    (the blocks after it leave their KV cells unwritten): a prompt spread over several decodes is
    still exact, and generation afterwards does not read the unwritten cells."""
    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=32, n_seq_max=4, flash_attn=False, type_k=0, type_v=0)
    before = model("the happy", max_tokens=6, temperature=0)["choices"][0]["text"]
    prompt = " ".join(["the happy dog"] * 33)
    states = model.hidden_states([prompt, "the sad cat"], layers=[1], pool="all")
    assert model.hook.stopped_at == 1  # the callback ended the last decode at l_out-1
    assert model.hook.stop_after == -1  # and the stop is off again
    expected = reference_states(model, tiny_weights, prompt)[:, [1]]
    assert len(expected) > 32
    np.testing.assert_allclose(states[0], expected, atol=ATOL, rtol=0)
    assert model("the happy", max_tokens=6, temperature=0)["choices"][0]["text"] == before
    model.close()


def test_stop_after_range_checked(tiny_model):
    with pytest.raises(IndexError, match="out of range"):
        tiny_model.hook.set_stop_after(tiny_model.n_layer)
    assert tiny_model.hook.stop_after == -1


def test_a_pool_per_prompt_in_one_pass(tiny_model):
    """Training reads the last token of every prompt and every token of a few in one trie walk."""
    from ggsteer.train.capture import capture_pooled

    prompts = ["the happy dog and a cat", "the happy dog", "i love the bad cat", "the happy dog and a cat", "a cat",
               "a cat"]
    pools = ["last", "all", "mean", "all", 2, 9]  # a count k: the mean of the last k tokens (of all, if fewer)
    stats = ggsteer.CaptureStats()
    states = capture_pooled(tiny_model, prompts, pools, layers=[0, 2], stats=stats)
    for prompt, pool, got in zip(prompts, pools, states):
        if isinstance(pool, int):
            every = tiny_model.hidden_states([prompt], layers=[0, 2], pool="all")[0]
            alone = every[-pool:].mean(axis=0)
            assert len(every) == 3  # <bos> a cat: 2 reads two rows, 9 all three
        else:
            alone = tiny_model.hidden_states([prompt], layers=[0, 2], pool=pool)[0]
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
    distinct = {tuple(t[:k]) for t in map(tiny_model.tokenize_prompt, prompts) for k in range(1, len(t) + 1)}
    assert stats.tokens == len(distinct)  # each shared prefix decoded once, whatever its prompts pool


def test_a_pool_per_prompt_is_checked(tiny_model):
    from ggsteer.train.capture import capture_pooled

    with pytest.raises(ValueError, match="2 prompts but 1 pools"):
        capture_pooled(tiny_model, ["the dog", "a cat"], ["last"])
    with pytest.raises(ValueError, match="unknown pool 'first'"):
        capture_pooled(tiny_model, ["the dog", "a cat"], ["last", "first"])
    with pytest.raises(ValueError, match="unknown pool 0: .* or a count of last tokens >= 1"):
        capture_pooled(tiny_model, ["the dog", "a cat"], ["last", 0])


def test_capture_leaves_generation_unchanged(tiny_model):
    before = tiny_model("the happy", max_tokens=5, temperature=0)["choices"][0]["text"]
    states = tiny_model.hidden_states(PROMPTS)
    after = tiny_model("the happy", max_tokens=5, temperature=0)["choices"][0]["text"]
    assert before == after
    # controls: the capture did run, and the text compared is not empty (an empty reply would always match)
    assert len(states) == len(PROMPTS) and np.abs(np.asarray(states)).max() > 0
    assert before.strip()


# -- bad input ------------------------------------------------------------------------------


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        SteeredModel(tmp_path / "nothere.gguf")


def test_non_gguf_model(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a GGUF.*fake.gguf"):
        SteeredModel(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers=[3]), "layer 3 is out of range.*0..2"),
        (dict(layers=[-1]), "layer -1 is out of range"),
        (dict(layers=[]), "layers is empty"),
        (dict(layers=[1, 1]), "layers repeat"),
        (dict(pool="max"), "unknown pool 'max'"),
        (dict(batch_size=0), "batch_size=0"),
    ],
)
def test_bad_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.hidden_states(["the dog"], **kwargs)


def test_empty_prompt_list(tiny_model):
    with pytest.raises(ValueError, match="prompt list is empty"):
        tiny_model.hidden_states([])


def test_empty_prompt(tiny_model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_model.hidden_states(["the dog", ""])


def test_single_string_rejected(tiny_model):
    with pytest.raises(TypeError, match="list of strings"):
        tiny_model.hidden_states("the dog")


def test_prompt_longer_than_context(tiny_model):
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens, more than the context holds \(n_ctx=256\)"):
        tiny_model.hidden_states([" ".join(["the dog"] * 200)])


# -- the default model ----------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_states(default_model):
    prompts = ["The weather today is", "Act as if you are extremely happy. I think that", "Hello"]
    states = default_model.hidden_states(prompts)
    assert states.shape == (3, 18, 640)
    assert np.isfinite(states).all()
    norms = np.linalg.norm(states, axis=-1).mean(axis=0)
    # residual norms grow with depth: from hundreds at block 0 to tens of thousands at the end
    assert norms[-1] > 10 * norms[0]
    assert np.corrcoef(np.arange(18), norms)[0, 1] > 0.9
    assert ggsteer.default_model_path().exists()


# -- rows copied off the device in few transfers --------------------------------------------


def transfers_during(model, capture):
    """Row transfers the hook made while `capture()` ran through the path of non-host backends."""
    model.hook.set_host_as_device(True)
    before = model.hook.counts()["row_transfers"]
    try:
        result = capture()
    finally:
        model.hook.set_host_as_device(False)
    return result, model.hook.counts()["row_transfers"] - before


def test_scattered_rows_match_reference_in_one_transfer_per_layer(tiny_model, tiny_weights):
    # unshared: the five prompts sit side by side in one decode; "last" wants one row of each,
    # rows far apart in the batch
    states, transfers = transfers_during(
        tiny_model, lambda: tiny_model.hidden_states(PROMPTS, layers=[2, 0], share_prefixes=False)
    )
    assert transfers == 2  # one per captured layer, not one per row (5 per layer)
    for i, prompt in enumerate(PROMPTS):
        expected = reference_states(tiny_model, tiny_weights, prompt)[-1]
        np.testing.assert_allclose(states[i], expected[[2, 0]], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(states, tiny_model.hidden_states(PROMPTS, layers=[2, 0], share_prefixes=False))


def test_rows_far_apart_travel_separately(tiny_weights, tiny_model_path):
    # two ~400-token prompts then a short one: the first last row is more than 64 KiB of rows
    # before the second; the third follows the second closely and shares its transfer
    model = SteeredModel(tiny_model_path, n_ctx=1024, n_batch=1024, n_seq_max=4, flash_attn=False, type_k=0, type_v=0)
    try:
        prompts = [" ".join(["the happy dog"] * 130), " ".join(["a sad cat"] * 130), "the dog"]
        lengths = [len(model.tokenize_prompt(p)) for p in prompts]
        assert min(lengths[:2]) * model.n_embd * 4 > 64 * 1024 and sum(lengths) <= 1024
        states, transfers = transfers_during(model, lambda: model.hidden_states(prompts, share_prefixes=False))
        # the last block keeps only the output rows, side by side: one transfer there
        assert transfers == 2 * (model.n_layer - 1) + 1
        for i, prompt in enumerate(prompts):
            np.testing.assert_allclose(states[i], reference_states(model, tiny_weights, prompt)[-1], atol=ATOL, rtol=0)
        everything, transfers = transfers_during(model, lambda: model.hidden_states(prompts[2:], pool="all"))
        assert transfers == model.n_layer  # contiguous rows: one transfer per layer
        np.testing.assert_allclose(everything[0], reference_states(model, tiny_weights, prompts[2]), atol=ATOL, rtol=0)
    finally:
        model.close()
