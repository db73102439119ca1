"""runtime.Context on the tiny model: llama_decode's status codes as llama.h defines them, the KV-cache
and logits operations, the adapter; native objects freed without close(); llama.cpp's log quiet
unless verbose."""

import gc
import logging
from dataclasses import replace

import llama_cpp
import numpy as np
import pytest
from support.models import TIGHT_LLAMA_KWARGS
from support.reference_model import reference_forward

from ggsteer import SteeredModel, cli
from ggsteer.runtime import batch as batch_module
from ggsteer.runtime import grammar as grammar_module
from ggsteer.runtime.batch import OwnedBatch
from ggsteer.runtime.context import (
    DecodeAbortedError,
    DecodeError,
    InvalidBatchError,
    KVCacheFullError,
    decode_error,
)
from ggsteer.runtime.grammar import check_grammar
from ggsteer.runtime.sampler import ChainOptions, TokenSampler
from ggsteer.vectors import ControlVector


@pytest.fixture(scope="module")
def model(tiny_model_path):
    """A model of its own: these tests fill its cache, abort its decodes and close it."""
    model = SteeredModel(tiny_model_path, n_ctx=256, n_batch=128, n_seq_max=4, **TIGHT_LLAMA_KWARGS)
    yield model
    model.close()


def filled(tokens, seq=0, start=0, logits_last=True):
    batch = OwnedBatch(len(tokens))
    for i, token in enumerate(tokens):
        batch.add(token, start + i, seq, logits_last and i == len(tokens) - 1)
    return batch


# -- status codes ---------------------------------------------------------------------------


def test_each_decode_status_maps_to_its_meaning_in_llama_h():
    assert decode_error(0) is None
    expected = {1: KVCacheFullError, 2: DecodeAbortedError, -1: InvalidBatchError}
    for status, kind in expected.items():
        error = decode_error(status)
        assert type(error) is kind and error.status == status
    for status in (-2, -3, 7):  # other fatal errors, and a positive warning llama.h does not define
        error = decode_error(status)
        assert type(error) is DecodeError and error.status == status
    assert "KV cache is full" in str(decode_error(1)) and "KV cache" not in str(decode_error(-1))
    assert "aborted" in str(decode_error(2)) and "fatal" in str(decode_error(-2))


def test_a_token_outside_the_vocabulary_is_an_invalid_batch(model):
    model.context.clear_memory()
    good = model.tokenize_prompt("the happy dog")
    with filled(good) as batch:
        model.decode_batch(batch.batch)  # positive control: the same batch with valid tokens decodes
    assert model.context.seq_pos_max(0) == len(good) - 1
    model.context.clear_memory()
    bad = filled(good[:-1] + [model.n_vocab() + 5])
    with bad, pytest.raises(InvalidBatchError, match="status -1: invalid input batch") as caught:
        model.decode_batch(bad.batch)
    assert caught.value.status == -1
    assert model.context.seq_pos_max(0) == -1  # llama.cpp restored the cache: nothing was kept


def test_a_sequence_id_past_n_seq_max_is_an_invalid_batch(model):
    model.context.clear_memory()
    tokens = model.tokenize_prompt("the dog")
    with filled(tokens, seq=model.n_seq_max - 1) as batch:
        model.decode_batch(batch.batch)
    with filled(tokens, seq=model.n_seq_max) as batch, pytest.raises(InvalidBatchError) as caught:
        model.decode_batch(batch.batch)
    assert caught.value.status == -1
    model.context.clear_memory()


def test_a_full_context_is_reported_as_a_full_kv_cache(model):
    model.context.clear_memory()
    n_ctx, n_batch = model.context.n_ctx(), model.n_batch
    token = model.tokenize_prompt("dog")[-1]
    for start in range(0, n_ctx, n_batch):  # every cell of the cache, n_batch rows a decode
        with filled([token] * n_batch, start=start) as batch:
            model.decode_batch(batch.batch)
    assert model.context.seq_pos_max(0) == n_ctx - 1
    one_more = filled([token], seq=1)
    with one_more, pytest.raises(KVCacheFullError, match="status 1: the KV cache is full") as caught:
        model.decode_batch(one_more.batch)
    assert caught.value.status == 1
    assert model.context.seq_pos_max(0) == n_ctx - 1 and model.context.seq_pos_max(1) == -1
    model.context.clear_memory()


def test_an_aborted_decode_is_reported_as_aborted(model):
    model.context.clear_memory()
    calls = []

    @llama_cpp.ggml_abort_callback
    def abort(_):
        calls.append(1)
        return True

    llama_cpp.llama_set_abort_callback(model.ctx, abort, None)
    try:
        batch = filled(model.tokenize_prompt("the happy dog"))
        with batch, pytest.raises(DecodeAbortedError, match="status 2: the decode was aborted") as caught:
            model.decode_batch(batch.batch)
    finally:
        llama_cpp.llama_set_abort_callback(model.ctx, llama_cpp.ggml_abort_callback(0), None)
    assert caught.value.status == 2 and calls
    model.context.clear_memory()
    with filled(model.tokenize_prompt("the happy dog")) as batch:
        model.decode_batch(batch.batch)  # the abort callback is gone: decodes work again
    model.context.clear_memory()


# -- KV cache, logits, adapter --------------------------------------------------------------


def test_sequence_operations_move_the_cached_positions(model):
    context = model.context
    context.clear_memory()
    tokens = model.tokenize_prompt("the happy dog sat")
    last = len(tokens) - 1
    assert last >= 3
    with filled(tokens) as batch:
        model.decode_batch(batch.batch)
    assert (context.seq_pos_min(0), context.seq_pos_max(0), context.seq_pos_max(1)) == (0, last, -1)
    context.seq_cp(0, 1)
    assert context.seq_pos_max(1) == last
    assert context.seq_rm(1, 2, -1)  # positions 2.. of sequence 1 only
    assert (context.seq_pos_max(0), context.seq_pos_max(1)) == (last, 1)
    context.seq_cp(0, 2, 0, 3)
    assert context.seq_pos_max(2) == 2
    context.seq_keep(1)
    assert [context.seq_pos_max(s) for s in range(3)] == [-1, 1, -1]
    context.clear_memory()
    assert context.seq_pos_max(1) == -1


def test_logits_rows_match_the_reference_forward_pass(model, tiny_weights):
    tokens = model.tokenize_prompt("a cat and the dog")
    model.context.clear_memory()
    with OwnedBatch(len(tokens)) as batch:
        for i, token in enumerate(tokens):
            batch.add(token, i, 0, i % 2 == 0)  # every other row is an output
        model.decode_batch(batch.batch)
    rows = list(range(0, len(tokens), 2))
    _, expected = reference_forward(tiny_weights, tokens, kv_f16=False)
    every = model.context.logits(len(rows))
    for k, row in enumerate(rows):  # logits_ith takes the batch row; logits() holds the outputs in order
        np.testing.assert_allclose(model.context.logits_ith(row), expected[row], atol=2e-3, rtol=0)
        np.testing.assert_array_equal(every[k], model.context.logits_ith(row))
    np.testing.assert_array_equal(model.context.logits_ith(-1), every[-1])
    assert model.context.logits_ith(1) is None  # row 1 asked for no logits
    model.context.clear_memory()


def last_logits(model, tokens):
    model.context.clear_memory()
    with filled(tokens) as batch:
        model.decode_batch(batch.batch)
    logits = model.context.logits_ith(-1).copy()
    model.context.clear_memory()
    return logits


def test_the_adapter_adds_a_vector_and_clears(model):
    tokens = model.tokenize_prompt("the happy dog")
    plain = last_logits(model, tokens)
    buffer = np.zeros((model.n_layer - 1, model.n_embd), np.float32)  # rows start at layer 1
    buffer[0] = np.random.default_rng(5).standard_normal(model.n_embd) * 3
    model.context.set_adapter_cvec(buffer, model.n_embd, 1, 1)
    try:
        assert np.abs(last_logits(model, tokens) - plain).max() > 0.1
    finally:
        model.context.set_adapter_cvec(None, model.n_embd)
    np.testing.assert_array_equal(last_logits(model, tokens), plain)


def test_a_closed_model_context_raises_instead_of_touching_freed_memory(tiny_model_path):
    model = SteeredModel(tiny_model_path, n_ctx=64, n_batch=32, n_seq_max=1, **TIGHT_LLAMA_KWARGS)
    context = model.context
    assert context.seq_pos_max(0) == -1 and not model.closed
    model.close()
    assert model.closed  # what the server's /health asks
    with pytest.raises(ValueError, match="the model is closed"):
        context.seq_pos_max(0)


# -- lifetime -------------------------------------------------------------------------------


@pytest.fixture
def batch_frees(monkeypatch):
    freed = []
    real = llama_cpp.llama_batch_free
    monkeypatch.setattr(batch_module.llama_cpp, "llama_batch_free", lambda b: (freed.append(b), real(b)))
    return freed


def test_a_batch_is_freed_without_close(batch_frees):
    batch = OwnedBatch(8)
    batch.add(1, 0, 0, True)
    del batch
    gc.collect()
    assert len(batch_frees) == 1


def test_a_batch_is_freed_once_by_close_or_with(batch_frees):
    batch = OwnedBatch(8)
    batch.close()
    batch.close()
    assert len(batch_frees) == 1
    with pytest.raises(ValueError, match="OwnedBatch is closed"):
        batch.add(1, 0, 0, True)
    with OwnedBatch(4) as other:
        assert not other.closed and len(batch_frees) == 1
    assert other.closed and len(batch_frees) == 2


def test_a_sampler_and_its_grammar_are_freed_once_without_close(model, monkeypatch):
    freed = []
    real = llama_cpp.llama_sampler_free
    monkeypatch.setattr(grammar_module.llama_cpp, "llama_sampler_free", lambda s: (freed.append(s), real(s)))
    options = ChainOptions(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, repeat_last_n=64,
                           presence_penalty=0.0, frequency_penalty=0.0, logit_bias=(), seed=None,
                           grammar='root ::= "yes" | "no"')
    sampler = TokenSampler(model, options, model.n_ctx())
    del sampler
    gc.collect()
    assert len(freed) == 2  # the chain (with its steps) and the grammar
    with TokenSampler(model, replace(options, grammar='root ::= "yes"'), model.n_ctx()) as sampler:
        sampler.sample(np.zeros(model.n_vocab(), np.float32))
    assert len(freed) == 4
    with pytest.raises(ValueError, match="TokenSampler is closed"):
        sampler.accept(1)
    check_grammar(model, 'root ::= "no"')  # parsed, then freed at once
    assert len(freed) == 5
    with pytest.raises(ValueError, match="the grammar does not parse"):
        check_grammar(model, "root ::= (")
    assert len(freed) == 5  # nothing was allocated


# -- llama.cpp's log ------------------------------------------------------------------------

# the tiny model was trained for 256 positions: a 512-cell context makes llama.cpp warn
OVERFLOW_WARNING = "n_ctx_seq (512) > n_ctx_train (256)"


@pytest.fixture
def restore_verbosity():
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    yield
    logger.setLevel(level)


def test_llama_log_is_quiet_unless_verbose(tiny_model_path, capfd, restore_verbosity):
    loud = SteeredModel(tiny_model_path, n_ctx=512, n_batch=32, n_seq_max=1, verbose=True, **TIGHT_LLAMA_KWARGS)
    loud.close()
    shown = capfd.readouterr().err
    assert OVERFLOW_WARNING in shown and "llama_context" in shown  # positive control: the lines exist
    quiet = SteeredModel(tiny_model_path, n_ctx=512, n_batch=32, n_seq_max=1, verbose=False, **TIGHT_LLAMA_KWARGS)
    try:
        assert capfd.readouterr().err == ""
        with filled([quiet.n_vocab() + 5]) as batch, pytest.raises(InvalidBatchError):
            quiet.decode_batch(batch.batch)
        # an error line stays visible
        assert "invalid token[0]" in capfd.readouterr().err
    finally:
        quiet.close()


def test_cli_verbose_shows_llama_log(tiny_model_path, tiny_weights, tmp_path, capfd, restore_verbosity):
    vector, n_embd = tmp_path / "v.gguf", tiny_weights.hparams.n_embd
    ControlVector({1: np.full(n_embd, 0.01, np.float32), 2: np.full(n_embd, 0.01, np.float32)}, "llama").save(vector)
    args = ["generate", "--model", str(tiny_model_path), "--prompt", "the dog", "-n", "4", "--temp", "0",
            "--threads", "2", "--vector", f"{vector}:0.5", "--raw"]
    assert cli.main(args) == 0
    quiet = capfd.readouterr()
    assert "llama_" not in quiet.err and quiet.out.strip()
    assert cli.main(args + ["--verbose"]) == 0
    assert "llama_context" in capfd.readouterr().err

