"""Baking steering into a model GGUF: the baked model equals runtime steering (tiny llama oracle)."""

import os

import gguf
import llama_cpp
import numpy as np
import pytest
from support.models import TIGHT_LLAMA_KWARGS
from support.reference_model import (
    TinyWeights,
    _add_hparams,
    _add_tensors,
    _add_tokenizer,
    attention,
    build_vocab,
    feed_forward,
    rms_norm,
    write_tiny_llama_gguf,
)

from ggsteer import ControlVector, SteeredModel
from ggsteer.bake import BakeError, ModelFileError, bake_model, describe_bake, edits, read_bake_metadata

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

ATOL = 5e-5  # llama.cpp F32 vs float64 numpy on the tiny model (as in test_steer.py)
PROMPTS = ["i am very happy and the dog", "the cat is sad", "you love a good dog today"]
MODEL_KWARGS = dict(n_ctx=256, n_batch=128, n_seq_max=4, **TIGHT_LLAMA_KWARGS)


# -- helpers --------------------------------------------------------------------------------


def last_logits(model, prompt):
    model.reset()
    model.eval(model.tokenize_prompt(prompt))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab(),)).copy()


def random_vector(seed, layers, n_embd=48, center=None, same_direction=False):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=n_embd)
    directions = {il: (shared if same_direction else rng.normal(size=n_embd)) * 1.5 for il in layers}
    metadata = {"unit": "gap"}
    if center is not None:
        metadata.update(layers=list(layers), center=[float(c) for c in center])
    return ControlVector(directions, "llama", metadata)


def read_weights(path):
    """The baked file's tensors, read with gguf-py (not ggsteer's reader): weights and biases."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    if any(t.tensor_type != gguf.GGMLQuantizationType.F32 for t in reader.tensors):
        tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    return tensors


def numpy_forward(tensors, hparams, tokens, embedding_edit=None, sublayer_edit=None):
    """llama's graph in float64 from raw tensors, biases added where llama.cpp adds them.

    `sublayer_edit(il, h)` edits the residual stream after block il's attention and after its FFN.
    """
    from support.reference_model import LayerWeights

    h = tensors["token_embd.weight"][np.asarray(tokens)].astype(np.float64)
    if embedding_edit is not None:
        h = embedding_edit(h)
    zero = np.zeros(hparams.n_embd)
    for il in range(hparams.n_layer):
        p = f"blk.{il}."
        layer = LayerWeights(*(tensors[p + n + ".weight"] for n in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")))
        edit = (lambda h: h) if sublayer_edit is None else (lambda h, il=il: sublayer_edit(il, h))
        h = edit(h + attention(rms_norm(h, layer.attn_norm, hparams.eps), layer, hparams, kv_f16=False)
                 + tensors.get(p + "attn_output.bias", zero))
        h = edit(h + feed_forward(rms_norm(h, layer.ffn_norm, hparams.eps), layer)
                 + tensors.get(p + "ffn_down.bias", zero))
    return rms_norm(h, tensors["output_norm.weight"], hparams.eps) @ tensors["output.weight"].T


def clamp_rows(h, u, target):
    u = u / np.linalg.norm(u)
    return h + (target - h @ u)[:, None] * u


@pytest.fixture
def baked_path(tmp_path):
    return tmp_path / "baked.gguf"


def write_weights(path, weights: TinyWeights):
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_hparams(writer, weights.hparams)
    _add_tokenizer(writer, *build_vocab())
    _add_tensors(writer, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# -- add: exact on llama ----------------------------------------------------------------------


@pytest.mark.parametrize("layers", [(1, 2), (2,), (1,)])
def test_add_bake_equals_adapter_and_numpy(tiny_model, tiny_model_path, tiny_weights, baked_path, layers):
    vector = random_vector(1, (1, 2))
    report = bake_model(tiny_model_path, baked_path, add=[(vector, 0.7)], layers=layers)
    assert report.exact and report.added_tensors == [f"blk.{il}.ffn_down.bias" for il in layers]
    tiny_model.set_control(vector, 0.7, layers=list(layers))
    baked = SteeredModel(baked_path, **MODEL_KWARGS)
    tensors = read_weights(baked_path)
    for prompt in PROMPTS:
        runtime = last_logits(tiny_model, prompt)
        np.testing.assert_allclose(last_logits(baked, prompt), runtime, atol=ATOL, rtol=0)
        expected = numpy_forward(tensors, tiny_weights.hparams, baked.tokenize_prompt(prompt))[-1]
        np.testing.assert_allclose(expected, runtime, atol=ATOL, rtol=0)
    baked.close()


def test_steering_on_top_of_a_baked_model_adds_up(tiny_model, tiny_model_path, baked_path):
    first, second = random_vector(2, (1, 2)), random_vector(3, (1, 2))
    bake_model(tiny_model_path, baked_path, add=[(first, 0.5)], layers=[1, 2])
    tiny_model.set_control([(first, 0.5), (second, -0.8)], layers=[1, 2])
    baked = SteeredModel(baked_path, **MODEL_KWARGS)
    baked.set_control(second, -0.8, layers=[1, 2])
    np.testing.assert_allclose(last_logits(baked, PROMPTS[0]), last_logits(tiny_model, PROMPTS[0]), atol=ATOL, rtol=0)
    baked.close()


# -- ablate / clamp: exact when one direction runs from the embedding through the layers ----


def projection_targets(vector, layers, op, value, center):
    targets = {il: (center[k] if center else 0.0) for k, il in enumerate(layers)}
    if op == "clamp":
        targets = {il: t + value * np.linalg.norm(vector.directions[il]) for il, t in targets.items()}
    return targets


def projected_reference(tensors, hparams, tokens, u, targets):
    """Runtime semantics of the exact bake: u out of the input, held at t_i after each sublayer of block i."""
    return numpy_forward(tensors, hparams, tokens, embedding_edit=lambda h: clamp_rows(h, u, 0.0),
                         sublayer_edit=lambda il, h: clamp_rows(h, u, targets[il]) if il in targets else h)[-1]


@pytest.mark.parametrize("op, value, center, layers", [
    ("ablate", None, None, (0, 1, 2)),
    ("ablate", None, (0.8, -1.5, 2.0), (0, 1, 2)),
    ("clamp", 0.6, (0.8, -1.5), (0, 1)),
    ("clamp", -1.0, None, (0,)),
])
def test_projection_bake_equals_sublayer_projection(tiny_weights, tiny_model_path, baked_path, op, value, center,
                                                    layers):
    vector = random_vector(4, layers, center=center, same_direction=True)
    kwargs = {"ablate": [vector]} if op == "ablate" else {"clamp": [(vector, value)]}
    report = bake_model(tiny_model_path, baked_path, layers=layers, **kwargs)
    centered = center is not None or op == "clamp"
    assert report.exact and report.operations[0].projection == ("centered" if centered else "plain")
    u = edits.unit(vector.directions[layers[0]])
    targets = projection_targets(vector, layers, op, value, center)
    baked = SteeredModel(baked_path, **MODEL_KWARGS)
    original = read_weights(tiny_model_path)
    tensors = read_weights(baked_path)
    for prompt in PROMPTS:
        tokens = baked.tokenize_prompt(prompt)
        expected = projected_reference(original, tiny_weights.hparams, tokens, u, targets)
        got = last_logits(baked, prompt)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(numpy_forward(tensors, tiny_weights.hparams, tokens)[-1], expected, atol=ATOL,
                                   rtol=0)
    # every row of every steered layer sits at its target, as the hook's clamp leaves it
    hidden = baked.hidden_states(PROMPTS, layers=list(layers), pool="all")
    for states in hidden:
        for k, il in enumerate(layers):
            np.testing.assert_allclose(np.asarray(states[:, k], np.float64) @ u, targets[il], atol=1e-4)
    baked.close()


def test_approximate_ablation_removes_each_layers_direction_at_its_layer(tiny_model_path, tiny_weights, baked_path):
    vector = random_vector(5, (1, 2), center=(0.5, -0.7))
    with pytest.raises(BakeError, match="do not start at 0.*direction differs.*approximate"):
        bake_model(tiny_model_path, baked_path, ablate=[vector], layers=[1, 2])
    with pytest.raises(BakeError, match="cannot bake clamp into llama even approximately"):
        bake_model(tiny_model_path, baked_path, clamp=[(vector, 1.0)], layers=[1, 2], approximate=True)
    assert not baked_path.exists()
    report = bake_model(tiny_model_path, baked_path, ablate=[vector], layers=[1, 2], approximate=True)
    assert not report.exact and report.operations[0].projection == "plain"
    assert "token_embd.weight" in report.edited_tensors and "blk.0.ffn_down.weight" in report.edited_tensors
    baked = SteeredModel(baked_path, **MODEL_KWARGS)
    unbaked = SteeredModel(tiny_model_path, **MODEL_KWARGS)
    for model, spread in ((baked, 1e-4), (unbaked, 1.0)):
        hidden = np.asarray(model.hidden_states(PROMPTS, layers=[1, 2], pool="last"), np.float64)
        for k, il in enumerate((1, 2)):  # every prompt's projection on the layer's own direction: 0 once baked
            projections = hidden[:, k] @ edits.unit(vector.directions[il])
            assert (np.abs(projections).max() < spread) == (model is baked), (il, projections)
    tensors = read_weights(baked_path)
    got = last_logits(baked, PROMPTS[0])
    np.testing.assert_allclose(got, numpy_forward(tensors, tiny_weights.hparams, baked.tokenize_prompt(PROMPTS[0]))[-1],
                               atol=ATOL, rtol=0)
    assert np.abs(got - last_logits(unbaked, PROMPTS[0])).max() > 100 * ATOL  # the edit did something
    baked.close()
    unbaked.close()


# -- wrong edits must fail the same comparison ----------------------------------------------


def test_missing_bias_fails_the_comparison(tiny_model, tiny_model_path, baked_path, monkeypatch):
    import ggsteer.bake.apply as apply

    real = apply._producers
    monkeypatch.setattr(apply, "_producers", lambda *a: (real(*a)[0], []))  # drop the created biases
    vector = random_vector(6, (1, 2))
    bake_model(tiny_model_path, baked_path, add=[(vector, 0.7)], layers=[1, 2])
    tiny_model.set_control(vector, 0.7, layers=[1, 2])
    baked = SteeredModel(baked_path, **MODEL_KWARGS)
    assert np.abs(last_logits(baked, PROMPTS[0]) - last_logits(tiny_model, PROMPTS[0])).max() > 100 * ATOL
    baked.close()


def test_transposed_projection_fails_the_comparison(tiny_weights, tiny_model_path, baked_path, monkeypatch):
    import ggsteer.bake.apply as apply

    real = edits.orthogonalise_writer

    def transposed(weight, w):  # projects the input side of square writers: the classic orientation bug
        return real(weight.T, w).T if weight.shape[0] == weight.shape[1] else real(weight, w)

    monkeypatch.setattr(apply.edits, "orthogonalise_writer", transposed)
    vector = random_vector(7, (0, 1, 2), same_direction=True)
    bake_model(tiny_model_path, baked_path, ablate=[vector], layers=[0, 1, 2])
    u = edits.unit(vector.directions[0])
    baked = SteeredModel(baked_path, **MODEL_KWARGS)
    tokens = baked.tokenize_prompt(PROMPTS[0])
    expected = projected_reference(read_weights(tiny_model_path), tiny_weights.hparams, tokens,
                                   u, {0: 0.0, 1: 0.0, 2: 0.0})
    assert np.abs(last_logits(baked, PROMPTS[0]) - expected).max() > 100 * ATOL
    baked.close()


# -- metadata -------------------------------------------------------------------------------


def test_bake_is_recorded_and_everything_else_copied(tiny_model_path, baked_path):
    vector = random_vector(8, (1, 2))
    bake_model(tiny_model_path, baked_path, add=[(vector, 0.4)], layers=[1, 2])
    meta = read_bake_metadata(baked_path)
    assert meta["ops"] == ["add"] and meta["layers"] == ["1-2"] and meta["exact"] == [True]
    assert meta["values"] == [pytest.approx(0.4)] and len(meta["vector_hashes"][0]) == 16
    assert ("add 0.4 at layers 1-2" in describe_bake(baked_path)
            and describe_bake(tiny_model_path) == "baked steering: none")
    source, baked = gguf.GGUFReader(str(tiny_model_path)), gguf.GGUFReader(str(baked_path))
    for name, field in source.fields.items():
        if not name.startswith("GGUF."):
            assert baked.fields[name].contents() == field.contents(), name
    baked_tensors = {t.name: t for t in baked.tensors}
    for tensor in source.tensors:
        assert np.array_equal(np.asarray(baked_tensors[tensor.name].data), np.asarray(tensor.data)), tensor.name


# -- bad input: clear errors, nothing written ------------------------------------------------


def write_fake_model(path, arch, n_embd=48, n_layer=2):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_tensor("token_embd.weight", np.ones((8, n_embd), np.float32))
    for il in range(n_layer):
        for name in ("attn_output", "ffn_down", "post_attention_norm", "post_ffw_norm"):
            shape = (n_embd,) if "norm" in name else (n_embd, n_embd)
            writer.add_tensor(f"blk.{il}.{name}.weight", np.ones(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_nothing_written(folder, before):
    assert sorted(os.listdir(folder)) == before


def test_bad_input_is_refused_and_nothing_written(tiny_model_path, tmp_path):
    vector = random_vector(9, (1, 2))
    out = tmp_path / "out.gguf"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(BakeError, match="n_embd 64 .* n_embd 48"):
        bake_model(tiny_model_path, out, add=[(random_vector(9, (1, 2), n_embd=64), 1.0)])
    gemma = tmp_path / "gemma.gguf"
    write_fake_model(gemma, "gemma3")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(BakeError, match="cannot bake add into gemma3: .*post-attention and post-FFN norms"):
        bake_model(gemma, out, add=[(vector, 1.0)], layers=[1])
    with pytest.raises(ValueError, match="architecture 'mamba'"):
        mamba = tmp_path / "mamba.gguf"
        write_fake_model(mamba, "mamba")
        before = sorted(os.listdir(tmp_path))
        bake_model(mamba, out, add=[(vector, 1.0)], layers=[1])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model_path.read_bytes()[:-1000])
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ModelFileError, match="truncated.gguf: truncated GGUF file: tensor 'output.weight'"):
        bake_model(truncated, out, add=[(vector, 1.0)], layers=[1])
    vector_file = tmp_path / "v.gguf"
    vector.save(vector_file)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ModelFileError, match="v.gguf: is a control-vector file, not a model"):
        bake_model(vector_file, out, add=[(vector, 1.0)], layers=[1])
    with pytest.raises(BakeError, match=r"layers \[3\] are beyond the model"):
        bake_model(tiny_model_path, out, add=[(vector, 1.0)], layers=[3])
    assert_nothing_written(tmp_path, before)
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="out.gguf: exists; pass force=True"):
        bake_model(tiny_model_path, out, add=[(vector, 1.0)], layers=[1])
    assert out.read_bytes() == b"keep me"
    bake_model(tiny_model_path, out, add=[(vector, 1.0)], layers=[1], force=True)
    with pytest.raises(BakeError, match="already has baked steering"):
        bake_model(out, tmp_path / "twice.gguf", add=[(vector, 1.0)], layers=[1])


# -- quantized models: only edited tensors are requantized, in their own type ----------------


QUANT_HPARAMS = dict(n_layer=3, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, seed=3)  # rows a multiple of 32


@pytest.fixture(scope="module")
def q5_models(tmp_path_factory):
    """The same random weights written as F32 and with every matrix in Q5_0.

    Q5_0, not Q8_0 or Q4_0: on this CPU llama.cpp's AMX kernels for Q8_0/Q4_0 die with an illegal
    instruction on batched decodes (the VM lists amx_tile but does not run it).
    """
    folder = tmp_path_factory.mktemp("q5")
    weights = write_tiny_llama_gguf(folder / "f32.gguf", **QUANT_HPARAMS)
    writer = gguf.GGUFWriter(str(folder / "q5.gguf"), "llama")
    _add_hparams(writer, weights.hparams)
    _add_tokenizer(writer, *build_vocab())
    for tensor in gguf.GGUFReader(str(folder / "f32.gguf")).tensors:
        data = np.asarray(tensor.data)
        if data.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q5_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q5_0)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder / "f32.gguf", folder / "q5.gguf", weights


def quantized_errors(q5_models, baked_path, expected_fn):
    """(baked Q5_0 vs the F32 oracle of the steering, unsteered Q5_0 vs F32): max |logit difference| over prompts."""
    f32_path, q5_path, weights = q5_models
    f32 = read_weights(f32_path)
    baked, plain = SteeredModel(baked_path, **MODEL_KWARGS), SteeredModel(q5_path, **MODEL_KWARGS)
    bake_error = quant_error = 0.0
    for prompt in PROMPTS:
        tokens = baked.tokenize_prompt(prompt)
        bake_error = max(bake_error, np.abs(last_logits(baked, prompt) - expected_fn(f32, tokens)).max())
        quant_error = max(quant_error,
                          np.abs(last_logits(plain, prompt) - numpy_forward(f32, weights.hparams, tokens)[-1]).max())
    baked.close()
    plain.close()
    return bake_error, quant_error


def test_quantized_add_keeps_every_matrix_and_matches_the_adapter(q5_models, baked_path):
    f32_path, q5_path, weights = q5_models
    vector = random_vector(10, (1, 2), n_embd=64)
    report = bake_model(q5_path, baked_path, add=[(vector, 0.8)], layers=[1, 2])
    assert report.edited_tensors == [] and abs(report.output_bytes / report.input_bytes - 1) < 0.15
    runtime, baked = SteeredModel(q5_path, **MODEL_KWARGS), SteeredModel(baked_path, **MODEL_KWARGS)
    runtime.set_control(vector, 0.8, layers=[1, 2])
    for prompt in PROMPTS:
        np.testing.assert_allclose(last_logits(baked, prompt), last_logits(runtime, prompt), atol=ATOL, rtol=0)
    runtime.close()
    baked.close()


def test_quantized_ablation_stays_within_quantization_error(q5_models, baked_path):
    f32_path, q5_path, weights = q5_models
    vector = random_vector(11, (0, 1, 2), n_embd=64, center=(0.5, -1.0, 1.5), same_direction=True)
    report = bake_model(q5_path, baked_path, ablate=[vector], layers=[0, 1, 2])
    assert abs(report.output_bytes / report.input_bytes - 1) < 0.15
    assert {t.tensor_type for t in gguf.GGUFReader(str(baked_path)).tensors if t.name.endswith("output.weight")} == \
        {gguf.GGMLQuantizationType.Q5_0}  # requantized in their own type
    u = edits.unit(vector.directions[0])
    targets = {0: 0.5, 1: -1.0, 2: 1.5}
    bake_error, quant_error = quantized_errors(
        q5_models, baked_path, lambda f32, tokens: projected_reference(f32, weights.hparams, tokens, u, targets))
    # measured: bake error 0.747, quantization error 0.528 (logits span about +-4): the edited writers
    # are rounded twice (Q5_0 of the F32 weights, then Q5_0 of the edit), about sqrt(2) times once
    assert bake_error < 2.0 * quant_error, (bake_error, quant_error)
    assert bake_error > 10 * ATOL  # it is quantized: the comparison can tell


def test_edited_tensors_are_encoded_by_ggmls_own_quantizer():
    from ggsteer.bake import quant

    x = np.random.default_rng(15).normal(size=(6, 512)).astype(np.float32)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0):  # gguf-py copies ggml's reference
        assert quant.encode_tensor(x, qtype) == gguf.quants.quantize(x, qtype).tobytes()
    q4k = np.frombuffer(quant.encode_tensor(x, gguf.GGMLQuantizationType.Q4_K), np.uint8).reshape(6, -1)
    error = gguf.quants.dequantize(q4k, gguf.GGMLQuantizationType.Q4_K) - x  # gguf-py cannot write Q4_K
    assert q4k.shape[1] == 512 // 256 * 144 and 0.01 < np.abs(error).mean() < 0.1


# -- Gemma 3 (post-norms): approximate edits, checked on the edited weights ----------------------


def write_fake_gemma(path, n_embd=48, n_layer=3, seed=0, missing=()):
    """A gemma3-shaped file (readers behind their pre-norms, writers, post-norms, tied embeddings);
    llama.cpp does not need to load it."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    tensors = {"token_embd.weight": rng.normal(size=(16, n_embd)).astype(np.float32)}
    for il in range(n_layer):
        tensors[f"blk.{il}.attn_output.weight"] = rng.normal(size=(n_embd, 32)).astype(np.float32)
        tensors[f"blk.{il}.ffn_down.weight"] = rng.normal(size=(n_embd, 64)).astype(np.float32)
        for norm in ("post_attention_norm", "post_ffw_norm", "attn_norm", "ffn_norm"):
            tensors[f"blk.{il}.{norm}.weight"] = (1 + rng.uniform(-0.9, 3.0, size=n_embd)).astype(np.float32)
        for reader, n_out in (("attn_q", 32), ("attn_k", 16), ("attn_v", 16), ("ffn_gate", 64), ("ffn_up", 64)):
            tensors[f"blk.{il}.{reader}.weight"] = rng.normal(size=(n_out, n_embd)).astype(np.float32)
    for name in missing:
        del tensors[name]
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_gemma_ablation_hides_u_from_the_next_blocks_readers(tmp_path, baked_path):
    original = write_fake_gemma(tmp_path / "gemma.gguf")
    vector = random_vector(13, (0, 1), center=(3.0, -2.0))
    with pytest.raises(BakeError, match="cannot bake ablate exactly into gemma3"):
        bake_model(tmp_path / "gemma.gguf", baked_path, ablate=[vector], layers=[0, 1])
    report = bake_model(tmp_path / "gemma.gguf", baked_path, ablate=[vector], layers=[0, 1], approximate=True)
    assert report.operations[0].projection == "plain" and "read it without" in report.operations[0].method
    tensors = read_weights(baked_path)
    rng = np.random.default_rng(1)
    h = rng.normal(size=(48, 5)) * 10
    for il in (0, 1):  # block il + 1 reads layer il's output as if it had nothing along u_il
        u = edits.unit(vector.directions[il].astype(np.float64))
        ablated = h - np.outer(u, u @ h)
        for norm, readers in (("attn_norm", ("attn_v",)),):  # the values: what later tokens copy
            g = original[f"blk.{il + 1}.{norm}.weight"].astype(np.float64)
            normed = g[:, None] * h / np.sqrt((h * h).mean(axis=0))  # the RMS of h: a common factor
            for reader in readers:
                name = f"blk.{il + 1}.{reader}.weight"
                expected = original[name] @ (g[:, None] * ablated / np.sqrt((h * h).mean(axis=0)))
                np.testing.assert_allclose(tensors[name] @ normed, expected, rtol=1e-4, atol=1e-4)
                assert np.abs(original[name] @ normed - expected).max() > 0.1  # the original did read u
    # the writers, the embeddings, the other readers and block 0's values are untouched
    assert sorted(report.edited_tensors) == ["blk.1.attn_v.weight", "blk.2.attn_v.weight"]
    for name in ("blk.1.attn_q.weight", "blk.2.ffn_up.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight"):
        np.testing.assert_array_equal(tensors[name], original[name])
    assert "attn_v projections" in report.operations[0].method
    assert report.operations[0].reasons == [  # the reader edit's own limits, not the writers'
        "gemma3 normalises each block's writes, so the next block's readers are edited instead: the residual "
        "stream, the other readers, later blocks and the output head still see the direction"]
    before = sorted(os.listdir(tmp_path))
    broken = tmp_path / "broken.gguf"
    write_fake_gemma(broken, missing=("blk.2.attn_v.weight",))
    with pytest.raises(BakeError, match=r"broken.gguf: tensor blk.2.attn_v.weight is missing"):
        bake_model(broken, tmp_path / "out.gguf", ablate=[vector], layers=[0, 1], approximate=True)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["broken.gguf"])
    with pytest.raises(BakeError, match="layer 2 is read only by the output head"):
        bake_model(tmp_path / "gemma.gguf", baked_path, ablate=[random_vector(13, (2,))], layers=[2], approximate=True,
                   force=True)


def test_gemma_ablation_is_never_called_exact(tmp_path, baked_path):
    """One direction from layer 0 without a center would be exact on llama; Gemma's post-norms still
    rescale a writer edit, so the bake asks for --approximate and then edits block 1's values."""
    original = write_fake_gemma(tmp_path / "gemma.gguf")
    vector = random_vector(15, (0,))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(BakeError, match="cannot bake ablate exactly into gemma3"):
        bake_model(tmp_path / "gemma.gguf", baked_path, ablate=[vector], layers=[0])
    assert_nothing_written(tmp_path, before)
    report = bake_model(tmp_path / "gemma.gguf", baked_path, ablate=[vector], layers=[0], approximate=True)
    assert report.edited_tensors == ["blk.1.attn_v.weight"]
    tensors = read_weights(baked_path)
    np.testing.assert_array_equal(tensors["blk.0.attn_output.weight"], original["blk.0.attn_output.weight"])


def test_gemma_add_is_refused_even_approximately(tmp_path, baked_path):
    write_fake_gemma(tmp_path / "gemma.gguf")
    before = sorted(os.listdir(tmp_path))
    for approximate in (False, True):
        with pytest.raises(BakeError, match="cannot bake add into gemma3: Gemma 3 normalises each block's writes"):
            bake_model(tmp_path / "gemma.gguf", baked_path, add=[(random_vector(14, (1, 2)), 0.5)], layers=[1, 2],
                       approximate=approximate)
    assert_nothing_written(tmp_path, before)


# -- command line ---------------------------------------------------------------------------


def test_cli_bake_and_inspect(tiny_model, tiny_model_path, tmp_path, capsys):
    from ggsteer.cli import main
    from ggsteer.cli.bake import describe_baked_model

    vector = random_vector(12, (1, 2))
    vector_path = tmp_path / "v.gguf"
    vector.save(vector_path)
    out = tmp_path / "baked.gguf"
    assert main(["bake", str(tiny_model_path), "--vector", f"{vector_path}:0.7", "--layers", "1-2",
                 "-o", str(out)]) == 0
    assert "add 0.7 at layers 1-2: added to blk.N.ffn_down.bias (exact)" in capsys.readouterr().out
    tiny_model.set_control(vector, 0.7, layers=[1, 2])
    baked = SteeredModel(out, **MODEL_KWARGS)
    np.testing.assert_allclose(last_logits(baked, PROMPTS[1]), last_logits(tiny_model, PROMPTS[1]), atol=ATOL, rtol=0)
    baked.close()
    assert "add 0.7 at layers 1-2" in describe_baked_model(out) and describe_baked_model(vector_path) is None

    assert main(["bake", str(tiny_model_path), "--vector", str(vector_path), "-o", str(out)]) == 2
    assert f"{out}: exists; pass force=True (--force)" in capsys.readouterr().err
    assert main(["bake", str(vector_path), "--ablate", str(vector_path), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "is a control-vector file, not a model" in capsys.readouterr().err
    assert main(["bake", str(tiny_model_path), "--clamp", str(vector_path), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "expected FILE:VALUE" in capsys.readouterr().err
    assert main(["bake", str(tiny_model_path), "--ablate", str(vector_path), "--layers", "1-2",
                 "-o", str(tmp_path / "x.gguf")]) == 2
    assert "cannot bake ablate exactly into llama" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
