"""Tests for ggsteer.vector_file: the control-vector GGUF format shared with llama.cpp.

How llama.cpp's side is checked: llama-cpp-python exposes no binding for llama.cpp's
control-vector *file* loader (``common_control_vector_load`` lives in libcommon, which is not
shipped), only ``llama_set_adapter_cvec``, which takes the buffer that loader produces. So
``llama_cpp_load_control_vector`` below parses files with ggml's own C GGUF parser
(``gguf_init_from_file`` in libggml-base, the call common.cpp makes), re-implements the rules of
``common_control_vector_load_one`` on top of it, and the tiny-llama tests hand the buffer to
``llama_set_adapter_cvec`` and compare llama.cpp's logits with the numpy reference model.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import struct
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggsteer.vectors.file import (
    FORMAT_VERSION,
    METADATA_KEYS,
    VectorFile,
    VectorFileError,
    VectorFileWarning,
    describe_vector_file,
    read_vector_file,
    write_vector_file,
)

N_EMBD = 16
F32 = np.float32
ARRAY, INT32, FLOAT32 = GGUFValueType.ARRAY, GGUFValueType.INT32, GGUFValueType.FLOAT32


def f32(value: float) -> float:
    """The float32 value a metadata float is stored as."""
    return float(np.float32(value))


def random_directions(layers, n_embd=N_EMBD, seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.standard_normal(n_embd).astype(F32) for layer in layers}


def full_metadata() -> dict[str, object]:
    # Per-layer values are aligned to the sorted layers [1, 4, 7].
    return {
        "method": "pca_diff",
        "model_name": "gemma-3-270m-q4_k_m.gguf",
        "separation": [f32(0.61), f32(0.83), f32(0.97)],
        "gap": [f32(1.25), f32(2.5), f32(3.1)],
        "residual_norm": [f32(12.3), f32(45.6), f32(78.9)],
        "center": [f32(-3.5), f32(0.25), f32(17.0)],
        "ablation_direction": [f32(x) for x in np.linspace(-1.0, 1.0, 3 * N_EMBD)],
        "ablation_center": [f32(-2.5), f32(0.5), f32(11.0)],
        "ablation_gap": [f32(1.0), f32(2.0), f32(2.75)],
        "stability": [f32(0.9), f32(0.99), f32(0.999)],
        "consistency": [f32(-0.01), f32(0.2), f32(0.45)],
        "pairs_used": 96,
        "dataset_size": 256,
        "dataset_hash": "sha256:0123abcd",
        "recommended_strength": f32(4.2),
        "recommended_layers": [4, 7],
        # the settings `ggsteer tune` chose
        "tuned_op": "clamp", "tuned_when": "generated", "tuned_layers": [4], "tuned_strength": f32(0.75),
        "tuned_max_kl": f32(0.25), "tuned_kl": f32(0.125), "tuned_gain": f32(1.5),
        "unit": "gap",
        "pool": "last",
        "n_layer": 18,
    }


def write_gguf(path, tensors, *, kv=(), architecture="controlvector", model_hint="llama", layer_count="auto"):
    """Write a GGUF with gguf-py, controlling every key and tensor (for files ggsteer would not write).

    kv: (key, value, GGUFValueType, sub_type) tuples added after the controlvector keys.
    architecture=None drops general.architecture; model_hint/layer_count=None leave the key out.
    """
    writer = gguf.GGUFWriter(str(path), architecture or "unused")
    if architecture is None:
        del writer.kv_data[0]["general.architecture"]
    if model_hint is not None:
        writer.add_string("controlvector.model_hint", model_hint)
    if layer_count is not None:
        writer.add_uint32("controlvector.layer_count", len(tensors) if layer_count == "auto" else layer_count)
    for key, value, value_type, sub_type in kv:
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for name, array in tensors:
        writer.add_tensor(name, np.asarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vector_tensors(*names, n_embd=N_EMBD):
    rng = np.random.default_rng(1)
    return [(name, rng.standard_normal(n_embd).astype(F32)) for name in names]


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


def file_is_mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return str(Path(path).resolve()) in maps.read()


@contextlib.contextmanager
def time_limit(seconds: float):
    """Turn a hang into a test failure (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def ggsteer_file(tmp_path):
    path = tmp_path / "honest.gguf"
    write_vector_file(path, random_directions([7, 1, 4]), model_hint="gemma3", metadata=full_metadata())
    return path


# ---------------------------------------------------------------------------------------------
# llama.cpp's loader: ggml's C GGUF parser + the rules of common_control_vector_load_one


class GgmlC:
    """ctypes bindings for the parts of libggml-base that llama.cpp's control-vector code uses."""

    class InitParams(ctypes.Structure):  # struct gguf_init_params
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]

    class GgmlInitParams(ctypes.Structure):  # struct ggml_init_params
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        p, i64, cstr = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
        # gguf_init_from_file(fname, params): the two-argument form of the pinned llama-cpp-python's ggml
        self._declare("gguf_init_from_file", [cstr, self.InitParams], p)
        self._declare("gguf_init_empty", [], p)
        self._declare("gguf_get_n_tensors", [p], i64)
        self._declare("gguf_get_tensor_name", [p, i64], cstr)
        self._declare("gguf_set_val_str", [p, cstr, cstr], None)
        self._declare("gguf_set_val_i32", [p, cstr, ctypes.c_int32], None)
        self._declare("gguf_add_tensor", [p, p], None)
        self._declare("gguf_write_to_file", [p, cstr, ctypes.c_bool], ctypes.c_bool)
        self._declare("gguf_free", [p], None)
        self._declare("ggml_init", [self.GgmlInitParams], p)
        self._declare("ggml_new_tensor_1d", [p, ctypes.c_int, i64], p)
        self._declare("ggml_set_name", [p, cstr], p)
        self._declare("ggml_get_tensor", [p, cstr], p)
        self._declare("ggml_n_dims", [p], ctypes.c_int)
        self._declare("ggml_nelements", [p], i64)
        self._declare("ggml_get_data_f32", [p], ctypes.POINTER(ctypes.c_float))
        self._declare("ggml_free", [p], None)

    def _declare(self, name, argtypes, restype):
        function = getattr(self.lib, name)
        function.argtypes, function.restype = argtypes, restype
        setattr(self, name, function)

    @staticmethod
    def tensor_type(tensor) -> int:
        return ctypes.cast(tensor, ctypes.POINTER(ctypes.c_int32))[0]  # ggml_tensor.type is the first field


GGML_TYPE_F32 = 0


def load_ggml() -> GgmlC | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = [lib_dir / name for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")]
    found = [path for path in candidates if path.exists()]
    return GgmlC(ctypes.CDLL(str(found[0]))) if found else None


@pytest.fixture(scope="module")
def ggml() -> GgmlC:
    loaded = load_ggml()
    if loaded is None:
        pytest.skip("llama_cpp's libggml-base is not available")
    return loaded


def stoi_like(text: str) -> int:
    """std::stoi as llama.cpp uses it: leading spaces, a sign, digits, anything after; -1 where it throws."""
    match = re.match(r"\s*([+-]?[0-9]+)", text)
    if match is None or not -(2**31) <= int(match.group(1)) < 2**31:
        return -1
    return int(match.group(1))


def llama_cpp_load_control_vector(ggml: GgmlC, path) -> tuple[int, np.ndarray] | None:
    """common_control_vector_load_one (common/common.cpp) at strength 1: (n_embd, buffer) or None
    where llama.cpp skips the file. The buffer holds direction.N at n_embd * (N - 1)."""
    ctx = ctypes.c_void_p()
    gguf_ctx = ggml.gguf_init_from_file(str(path).encode(), GgmlC.InitParams(False, ctypes.pointer(ctx)))
    if not gguf_ctx:
        return None
    try:
        return _apply_loader_rules(ggml, gguf_ctx, ctx)
    finally:
        ggml.gguf_free(gguf_ctx)
        ggml.ggml_free(ctx)


def _apply_loader_rules(ggml: GgmlC, gguf_ctx, ctx) -> tuple[int, np.ndarray] | None:
    n_embd, data = -1, np.zeros(0, dtype=F32)
    for index in range(ggml.gguf_get_n_tensors(gguf_ctx)):
        name = ggml.gguf_get_tensor_name(gguf_ctx, index).decode()
        prefix, dot, rest = name.partition(".")
        layer = stoi_like(rest) if dot and prefix == "direction" else -1
        if layer <= 0:
            return None  # invalid/unparsable, or zero, layer index
        tensor = ggml.ggml_get_tensor(ctx, name.encode())
        if GgmlC.tensor_type(tensor) != GGML_TYPE_F32 or ggml.ggml_n_dims(tensor) != 1:
            return None
        n_elements = ggml.ggml_nelements(tensor)
        if n_embd not in (-1, n_elements):
            return None  # does not match previous dimensions
        n_embd = n_elements
        if data.size < n_embd * layer:
            data = np.concatenate([data, np.zeros(n_embd * layer - data.size, dtype=F32)])
        source = np.ctypeslib.as_array(ggml.ggml_get_data_f32(tensor), shape=(n_embd,))
        data[n_embd * (layer - 1): n_embd * layer] += source  # several directions for a layer add up
    return None if n_embd == -1 else (n_embd, data)  # no tensors: "no valid control vector files"


def write_like_cvector_generator(ggml: GgmlC, path, measured: list[np.ndarray], model_hint: str) -> None:
    """export_gguf of tools/cvector-generator: the same ggml/gguf C calls, names and key types."""
    ctx = ggml.ggml_init(GgmlC.GgmlInitParams(1 << 20, None, False))
    gguf_ctx = ggml.gguf_init_empty()
    try:
        ggml.gguf_set_val_str(gguf_ctx, b"general.architecture", b"controlvector")
        ggml.gguf_set_val_str(gguf_ctx, b"controlvector.model_hint", model_hint.encode())
        ggml.gguf_set_val_i32(gguf_ctx, b"controlvector.layer_count", len(measured))
        for il, vector in enumerate(measured):  # vector il was measured at l_out-il
            tensor = ggml.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, len(vector))
            ggml.ggml_set_name(tensor, f"direction.{il + 1}".encode())  # pca.hpp / mean.hpp naming
            np.ctypeslib.as_array(ggml.ggml_get_data_f32(tensor), shape=(len(vector),))[:] = vector
            ggml.gguf_add_tensor(gguf_ctx, tensor)
        assert ggml.gguf_write_to_file(gguf_ctx, str(path).encode(), False)
    finally:
        ggml.gguf_free(gguf_ctx)
        ggml.ggml_free(ctx)


def test_written_file_passes_llama_cpp_loader(ggml, ggsteer_file):
    loaded = llama_cpp_load_control_vector(ggml, ggsteer_file)
    assert loaded is not None
    n_embd, buffer = loaded
    expected = random_directions([7, 1, 4])
    assert n_embd == N_EMBD and buffer.size == 7 * N_EMBD
    for layer in range(1, 8):
        segment = buffer[(layer - 1) * N_EMBD: layer * N_EMBD]
        assert np.array_equal(segment, expected.get(layer, np.zeros(N_EMBD, dtype=F32)))


BAD_FOR_LLAMA_CPP = {
    "direction.0": lambda path: write_gguf(path, vector_tensors("direction.1", "direction.0")),
    "direction.-1": lambda path: write_gguf(path, vector_tensors("direction.-1")),
    "unparsable name": lambda path: write_gguf(path, vector_tensors("direction.x")),
    "not a direction": lambda path: write_gguf(path, vector_tensors("direction.1", "steer.2")),
    "F16 tensor": lambda path: write_gguf(path, [("direction.1", np.ones(N_EMBD, np.float16))]),
    "2-D tensor": lambda path: write_gguf(path, [("direction.1", np.ones((2, N_EMBD), F32))]),
    "unequal lengths": lambda path: write_gguf(
        path, vector_tensors("direction.1") + vector_tensors("direction.2", n_embd=8)
    ),
    "no tensors": lambda path: write_gguf(path, []),
    "not GGUF": lambda path: path.write_bytes(b"GGML not a gguf file at all"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOR_LLAMA_CPP))
def test_files_llama_cpp_rejects_are_rejected(ggml, tmp_path, case):
    path = tmp_path / "bad.gguf"
    BAD_FOR_LLAMA_CPP[case](path)
    assert llama_cpp_load_control_vector(ggml, path) is None
    with pytest.raises(VectorFileError, match=re.escape(str(path))):
        read_vector_file(path)


def test_trailing_unit_dimension_is_1d_for_both(ggml, tmp_path):
    # ggml_n_dims ignores trailing 1s: numpy (1, n) is ggml ne = [n, 1], which llama.cpp accepts.
    path = write_gguf(tmp_path / "row.gguf", [("direction.2", np.arange(N_EMBD, dtype=F32).reshape(1, N_EMBD))])
    assert llama_cpp_load_control_vector(ggml, path)[0] == N_EMBD
    assert np.array_equal(read_vector_file(path).directions[2], np.arange(N_EMBD, dtype=F32))


# ---------------------------------------------------------------------------------------------
# llama.cpp applies direction.N to the output of block N (checked against the numpy reference)

TIGHT_ATOL = 5e-5  # see tests/test_reference_model.py


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
        flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    yield llm
    llm.close()


def logits_with_control_vector(llm, loaded, tokens) -> np.ndarray:
    import llama_cpp

    n_embd, buffer = loaded
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    # llama_set_adapter_cvec only overwrites the layers the buffer covers: pad it so that no layer
    # of a vector set earlier lingers (a buffer longer than the model's layers is passed as it is).
    buffer = np.concatenate([buffer, np.zeros(max(0, (n_layer - 1) * n_embd - buffer.size), dtype=F32)])
    pointer = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, buffer.size, n_embd, 1, n_layer - 1) == 0
    try:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, 0, 0)  # clear it for the next test


def reference_logits(weights, tokens, steer: dict[int, np.ndarray]) -> np.ndarray:
    from support.reference_model import reference_forward

    hook = lambda il, h: h + steer[il] if il in steer else h  # noqa: E731
    return reference_forward(weights, tokens, kv_f16=False, block_output_hook=hook)[1]


@pytest.mark.parametrize("layer", [1, 2])
def test_llama_cpp_applies_direction_n_at_block_n(ggml, tiny_llm, tiny_weights, tmp_path, layer):
    n_embd = tiny_weights.hparams.n_embd
    direction = 2.0 * np.random.default_rng(layer).standard_normal(n_embd).astype(F32)
    path = tmp_path / "steer.gguf"
    write_vector_file(path, {layer: direction}, model_hint="llama")
    tokens = tiny_llm.tokenize(b"the happy dog is very good")

    steered = logits_with_control_vector(tiny_llm, llama_cpp_load_control_vector(ggml, path), tokens)

    at_block_n = reference_logits(tiny_weights, tokens, {layer: direction})
    at_block_n_minus_1 = reference_logits(tiny_weights, tokens, {layer - 1: direction})
    assert np.abs(steered - at_block_n).max() < TIGHT_ATOL
    assert np.abs(steered - at_block_n_minus_1).max() > 100 * TIGHT_ATOL


def test_llama_cpp_ignores_layers_past_the_last_block(ggml, tiny_llm, tiny_weights, tmp_path):
    n_layer, n_embd = tiny_weights.hparams.n_layer, tiny_weights.hparams.n_embd
    path = tmp_path / "beyond.gguf"
    write_vector_file(path, {n_layer: np.full(n_embd, 3.0, F32)}, model_hint="llama")
    tokens = tiny_llm.tokenize(b"i feel sad today")
    steered = logits_with_control_vector(tiny_llm, llama_cpp_load_control_vector(ggml, path), tokens)
    assert np.abs(steered - reference_logits(tiny_weights, tokens, {})).max() < TIGHT_ATOL


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_is_exact(tmp_path):
    directions = random_directions([7, 1, 4])
    directions[4][:4] = [-0.0, np.finfo(F32).tiny / 8, np.finfo(F32).max, -np.finfo(F32).max]  # edge values
    path = tmp_path / "v.gguf"
    write_vector_file(path, directions, model_hint="gemma3", metadata=full_metadata())

    vf = read_vector_file(path)

    assert isinstance(vf, VectorFile)
    assert vf.model_hint == "gemma3" and vf.source == "ggsteer"
    assert list(vf.directions) == [1, 4, 7] and vf.layers == [1, 4, 7] and vf.n_embd == N_EMBD
    for layer, vector in directions.items():
        assert vf.directions[layer].dtype == F32
        assert vf.directions[layer].tobytes() == vector.tobytes()
    assert vf.metadata == {"version": FORMAT_VERSION, "n_embd": N_EMBD, "layers": [1, 4, 7], **full_metadata()}
    assert vf.per_layer("gap") == {1: f32(1.25), 4: f32(2.5), 7: f32(3.1)}


def test_file_layout(ggsteer_file):
    reader = gguf.GGUFReader(ggsteer_file)
    keys = [name for name in reader.fields if not name.startswith("GGUF.")]
    assert keys[:3] == ["general.architecture", "controlvector.model_hint", "controlvector.layer_count"]
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].types == [GGUFValueType.UINT32]
    assert reader.fields["controlvector.layer_count"].contents() == 3
    assert [tensor.name for tensor in reader.tensors] == ["direction.1", "direction.4", "direction.7"]
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1
    expected_types = {
        "str": [GGUFValueType.STRING],
        "uint32": [GGUFValueType.UINT32],
        "float32": [GGUFValueType.FLOAT32],
        "int32[]": [GGUFValueType.ARRAY, GGUFValueType.INT32],
        "float32[]": [GGUFValueType.ARRAY, GGUFValueType.FLOAT32],
    }
    for key, spec in METADATA_KEYS.items():
        kind = {GGUFValueType.STRING: "str", GGUFValueType.UINT32: "uint32", GGUFValueType.FLOAT32: "float32",
                GGUFValueType.INT32: "int32"}[spec.gguf_type] + ("[]" if spec.is_array else "")
        assert reader.fields[f"ggsteer.{key}"].types == expected_types[kind], key


def test_without_metadata_only_automatic_keys(tmp_path):
    path = tmp_path / "plain.gguf"
    write_vector_file(path, random_directions([2, 3]), model_hint="llama")
    vf = read_vector_file(path)
    assert vf.source == "ggsteer"
    assert vf.metadata == {"version": FORMAT_VERSION, "n_embd": N_EMBD, "layers": [2, 3]}


def test_input_forms_are_normalized(tmp_path):
    path = tmp_path / "forms.gguf"
    directions = {np.int64(3): np.arange(N_EMBD, dtype=np.float64), 1: list(range(N_EMBD))}
    metadata = {
        "gap": {3: 2.0, 1: 1.0},  # a dict per layer is put in layer order
        "separation": np.array([0.5, 0.25]),
        "dataset_size": np.uint32(12),
        "recommended_layers": (3,),
        "layers": np.array([1, 3]),
        "version": FORMAT_VERSION,
    }
    write_vector_file(path, directions, model_hint="llama", metadata=metadata)
    vf = read_vector_file(path)
    assert vf.layers == [1, 3]
    assert np.array_equal(vf.directions[3], np.arange(N_EMBD, dtype=F32))
    assert vf.metadata["gap"] == [1.0, 2.0] and vf.metadata["separation"] == [0.5, 0.25]
    assert vf.metadata["dataset_size"] == 12 and vf.metadata["recommended_layers"] == [3]


def test_per_layer_values_follow_the_callers_layer_order(tmp_path):
    path = tmp_path / "order.gguf"
    metadata = {"layers": [7, 1, 4], "gap": [7.0, 1.0, 4.0], "separation": {4: 0.4, 7: 0.7, 1: 0.1}}
    write_vector_file(path, random_directions([4, 7, 1]), model_hint="llama", metadata=metadata)
    vf = read_vector_file(path)
    assert vf.metadata["layers"] == [1, 4, 7]  # files hold layers, and per-layer values, sorted
    assert vf.metadata["gap"] == [1.0, 4.0, 7.0]
    assert vf.per_layer("separation") == {1: f32(0.1), 4: f32(0.4), 7: f32(0.7)}


def test_per_layer_vectors_follow_the_callers_layer_order(tmp_path):
    path = tmp_path / "order.gguf"
    rows = {7: [7.0] * N_EMBD, 1: [1.0] * N_EMBD, 4: [4.0] * N_EMBD}
    metadata = {"layers": [7, 1, 4], "ablation_direction": rows[7] + rows[1] + rows[4]}
    write_vector_file(path, random_directions([4, 7, 1]), model_hint="llama", metadata=metadata)
    assert read_vector_file(path).metadata["ablation_direction"] == rows[1] + rows[4] + rows[7]
    with pytest.raises(VectorFileError, match=r"ablation_direction has 47 values but 3 layers of n_embd 16 need 48"):
        write_vector_file(tmp_path / "short.gguf", random_directions([1, 4, 7]), model_hint="llama",
                          metadata={"ablation_direction": [1.0] * 47})


def test_extra_metadata_keys_round_trip_exactly(tmp_path):
    extra = {
        "note": "trained on CPU",
        "flag": True,
        "seed": -(2**40),
        "temperature": 0.1,  # a float64: stored losslessly
        "names": ["a", "b"],
        "mixed_numbers": [1, 2.5],
        "flags": np.array([True, False]),
        "vendor.detail": 3,
    }
    path = tmp_path / "extra.gguf"
    write_vector_file(path, random_directions([1]), model_hint="llama", metadata={"method": "mean_diff", **extra})
    vf = read_vector_file(path)
    expected = {**extra, "mixed_numbers": [1.0, 2.5], "flags": [True, False]}
    assert {key: vf.metadata[key] for key in extra} == expected
    assert type(vf.metadata["temperature"]) is float and type(vf.metadata["seed"]) is int
    reader = gguf.GGUFReader(path)
    assert reader.fields["ggsteer.seed"].types == [GGUFValueType.INT64]
    assert reader.fields["ggsteer.mixed_numbers"].types == [ARRAY, GGUFValueType.FLOAT64]
    # A file read back can be written again as it is.
    write_vector_file(path, vf.directions, model_hint=vf.model_hint, metadata=vf.metadata, overwrite=True)
    assert read_vector_file(path).metadata == vf.metadata


def test_layer_offset_moves_metadata_layers_too(ggsteer_file):
    vf = read_vector_file(ggsteer_file, layer_offset=-1)
    assert vf.layers == [0, 3, 6]
    assert vf.metadata["layers"] == [0, 3, 6] and vf.metadata["recommended_layers"] == [3, 6]
    assert vf.per_layer("separation") == {0: f32(0.61), 3: f32(0.83), 6: f32(0.97)}
    # Layer 0 is fine in memory but cannot go back into a file.
    with pytest.raises(VectorFileError, match="layer 0"):
        write_vector_file(ggsteer_file.with_name("back.gguf"), vf.directions, model_hint=vf.model_hint)


# ---------------------------------------------------------------------------------------------
# Files from elsewhere


def write_like_repeng(path, directions: dict[int, np.ndarray], model_type: str) -> None:
    """repeng/extract.py ControlVector.export_gguf, step by step."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions:  # dict order, as repeng does (not sorted)
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_repeng_file_loads_as_external(tmp_path):
    n_layers = 6
    # read_representations' default hidden_layers, range(-1, -n, -1), normalized: n-1 down to 1.
    repeng_layers = [n_layers + i for i in range(-1, -n_layers, -1)]
    directions = random_directions(repeng_layers, seed=3)  # PCA components cast to float32
    path = tmp_path / "repeng.gguf"
    write_like_repeng(str(path), directions, "llama")

    vf = read_vector_file(path)

    assert vf.source == "external" and vf.metadata == {} and vf.model_hint == "llama"
    assert vf.layers == [1, 2, 3, 4, 5]
    for layer, vector in directions.items():
        assert np.array_equal(vf.directions[layer], vector)
    assert "source:      external" in describe_vector_file(vf)


@pytest.fixture(params=["ggml-c", "gguf-py"])
def cvector_generator_file(request, tmp_path):
    """A file as cvector-generator writes it for a 6-block model, and the vectors measured at l_out-0..4."""
    measured = [np.full(N_EMBD, il + 0.5, dtype=F32) for il in range(6 - 1)]  # the last block is not captured
    path = tmp_path / "cvector.gguf"
    if request.param == "ggml-c":
        write_like_cvector_generator(request.getfixturevalue("ggml"), path, measured, "qwen2")
    else:
        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", "qwen2")
        writer.add_int32("controlvector.layer_count", len(measured))  # gguf_set_val_i32, not uint32
        for il, vector in enumerate(measured):
            writer.add_tensor(f"direction.{il + 1}", vector)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path, measured


def test_cvector_generator_file_loads_with_llama_cpp_semantics(cvector_generator_file):
    path, measured = cvector_generator_file
    vf = read_vector_file(path)  # an int32 layer_count equal to the tensor count: no warning
    assert vf.source == "external" and vf.model_hint == "qwen2"
    assert vf.layers == [1, 2, 3, 4, 5]
    assert np.array_equal(vf.directions[1], measured[0])  # applied one block after it was measured


def test_cvector_generator_file_with_offset_maps_to_measured_layer(cvector_generator_file):
    path, measured = cvector_generator_file
    vf = read_vector_file(path, layer_offset=-1)
    assert vf.layers == [0, 1, 2, 3, 4]
    for il, vector in enumerate(measured):
        assert np.array_equal(vf.directions[il], vector)  # direction.(il+1) -> layer il


def test_offset_below_zero_is_an_error(cvector_generator_file):
    path, _ = cvector_generator_file
    with pytest.raises(VectorFileError, match=r"'direction\.1'.*layer_offset=-2.*-1") as caught:
        read_vector_file(path, layer_offset=-2)
    assert str(path) in str(caught.value)


def test_layer_offset_must_be_int(ggsteer_file):
    with pytest.raises(TypeError):
        read_vector_file(ggsteer_file, layer_offset=1.0)


# ---------------------------------------------------------------------------------------------
# Writing: bad input


def assert_write_fails(tmp_path, directions, match, *, model_hint="llama", metadata=None):
    path = tmp_path / "out.gguf"
    with pytest.raises(VectorFileError, match=match) as caught:
        write_vector_file(path, directions, model_hint=model_hint, metadata=metadata)
    assert str(path) in str(caught.value)
    assert listing(tmp_path) == []  # neither the file nor a temporary file
    return caught.value


def test_write_refuses_layer_0(tmp_path):
    message = str(assert_write_fails(tmp_path, random_directions([0, 1]), "layer 0"))
    assert "llama.cpp" in message and "block 0" in message


@pytest.mark.parametrize(
    "directions, match",
    [
        ({}, "non-empty"),
        ({-1: np.ones(N_EMBD)}, "layer -1"),
        ({2**31: np.ones(N_EMBD)}, "layer 2147483648"),
        ({"3": np.ones(N_EMBD)}, "layer keys must be ints.*'3'"),
        ({1.0: np.ones(N_EMBD)}, "layer keys must be ints"),
        ({True: np.ones(N_EMBD)}, "layer keys must be ints"),
        ({1: np.ones(N_EMBD), 5: np.ones(N_EMBD + 1)}, "layer 5 has length 17 but layer 1 has 16"),
        ({4: np.ones((2, N_EMBD))}, r"layer 4.*1-D.*\(2, 16\)"),
        ({4: np.ones(0)}, "layer 4.*non-empty"),
        ({4: 1.5}, "layer 4.*1-D"),
        ({4: ["a", "b"]}, "layer 4.*real numbers"),
        ({4: [[1.0], [1.0, 2.0]]}, "layer 4.*not an array"),
        ({2: np.ones(N_EMBD), 7: np.r_[np.ones(N_EMBD - 1), np.nan]}, "layer 7.*non-finite.*index 15"),
        ({7: np.r_[np.inf, np.ones(N_EMBD - 1)]}, "layer 7.*non-finite"),
        ({7: np.full(N_EMBD, 1e300)}, "layer 7.*non-finite"),  # float64 that overflows float32
    ],
)
def test_write_rejects_bad_directions(tmp_path, directions, match):
    assert_write_fails(tmp_path, directions, match)


@pytest.mark.parametrize("model_hint", ["", None, 3])
def test_write_rejects_bad_model_hint(tmp_path, model_hint):
    assert_write_fails(tmp_path, random_directions([1]), "model_hint", model_hint=model_hint)


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"method": 3}, "ggsteer.method must be a str"),
        ({"model_name": b"bytes"}, "ggsteer.model_name must be a str"),
        ({"dataset_size": -1}, "ggsteer.dataset_size must be a uint32"),
        ({"dataset_size": 2**32}, "ggsteer.dataset_size must be a uint32"),
        ({"dataset_size": 3.0}, "ggsteer.dataset_size must be a uint32"),
        ({"dataset_size": True}, "ggsteer.dataset_size must be a uint32"),
        ({"recommended_strength": float("nan")}, "ggsteer.recommended_strength must be a finite float32"),
        ({"recommended_strength": 1e39}, "ggsteer.recommended_strength must be a finite float32"),
        ({"recommended_strength": "4"}, "ggsteer.recommended_strength must be a finite float32"),
        ({"gap": [1.0, 2.0]}, "ggsteer.gap has 2 values but there are 3 layers"),
        ({"separation": [1.0, 2.0, 3.0, 4.0]}, "ggsteer.separation has 4 values but there are 3 layers"),
        ({"residual_norm": [1.0, float("inf"), 2.0]}, "ggsteer.residual_norm must be a non-empty list of finite"),
        ({"gap": np.ones((3, 1))}, "ggsteer.gap must be a non-empty list"),
        ({"gap": {1: 1.0, 4: 2.0, 8: 3.0}}, r"ggsteer.gap has values for layers \[1, 4, 8\]"),
        ({"recommended_layers": []}, "ggsteer.recommended_layers must be a non-empty list of int32"),
        ({"recommended_layers": [4, 9]}, r"recommended_layers has layers \[9\] that have no direction"),
        ({"layers": [1, 4]}, r"ggsteer.layers is \[1, 4\]; the directions are for layers \[1, 4, 7\]"),
        ({"layers": [1, 4, 4, 7]}, r"ggsteer.layers is \[1, 4, 4, 7\]"),
        ({"n_layer": 7}, "ggsteer.n_layer is 7 but layer 7 has a direction"),
        ({"unit": 1}, "ggsteer.unit must be a str"),
        ({"n_embd": 8}, "ggsteer.n_embd is 8 but the directions have length 16"),
        ({"version": 2}, "ggsteer.version is written as 1"),
        ({"version": [1]}, "ggsteer.version must be a uint32"),
        ({"ggsteer.method": "x"}, "without the 'ggsteer.' prefix"),
        ({"bad key": 1}, "metadata key 'bad key' must be made of"),
        ({3: 1}, "metadata key 3 must be made of"),
        ({"extra": None}, "ggsteer.extra must be a str, bool, int64"),
        ({"extra": {"a": 1}}, "ggsteer.extra must be"),
        ({"extra": [1, "a"]}, "ggsteer.extra must be"),
        ({"extra": []}, "ggsteer.extra must be"),
        ({"extra": [[1]]}, "ggsteer.extra must be"),
        ({"extra": float("inf")}, "ggsteer.extra must be"),
        ({"extra": 2**63}, "ggsteer.extra must be"),
        ({"extra": b"bytes"}, "ggsteer.extra must be"),
    ],
)
def test_write_rejects_bad_metadata(tmp_path, metadata, match):
    assert_write_fails(tmp_path, random_directions([1, 4, 7]), match, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Writing: overwrite, atomicity, temporary files


def test_refuses_to_overwrite_and_keeps_old_bytes(tmp_path):
    path = tmp_path / "existing.gguf"
    path.write_bytes(b"precious old bytes")
    with pytest.raises(FileExistsError) as caught:
        write_vector_file(path, random_directions([1]), model_hint="llama")
    assert str(path) in str(caught.value)
    assert path.read_bytes() == b"precious old bytes"
    assert listing(tmp_path) == ["existing.gguf"]


def test_overwrite_replaces(tmp_path, ggsteer_file):
    write_vector_file(ggsteer_file, random_directions([2], seed=9), model_hint="llama", overwrite=True)
    assert read_vector_file(ggsteer_file).layers == [2]
    assert listing(tmp_path) == [ggsteer_file.name]


def test_success_leaves_only_the_file(tmp_path):
    write_vector_file(tmp_path / "a.gguf", random_directions([1, 2]), model_hint="llama")
    write_vector_file(str(tmp_path / "b.gguf"), random_directions([3]), model_hint="llama")
    assert listing(tmp_path) == ["a.gguf", "b.gguf"]


def test_failure_while_writing_keeps_old_file_and_leaves_no_temp(tmp_path, ggsteer_file, monkeypatch):
    old_bytes = ggsteer_file.read_bytes()

    def disk_full(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_vector_file(ggsteer_file, random_directions([5]), model_hint="llama", overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        write_vector_file(tmp_path / "new.gguf", random_directions([5]), model_hint="llama")
    assert ggsteer_file.read_bytes() == old_bytes
    assert listing(tmp_path) == [ggsteer_file.name]


def test_file_appearing_during_write_is_not_clobbered(tmp_path, monkeypatch):
    path = tmp_path / "race.gguf"
    original = gguf.GGUFWriter.write_tensors_to_file

    def someone_else_writes_first(self, **kwargs):
        path.write_bytes(b"the other writer's file")
        return original(self, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", someone_else_writes_first)
    with pytest.raises(FileExistsError):
        write_vector_file(path, random_directions([1]), model_hint="llama")
    assert path.read_bytes() == b"the other writer's file"
    assert listing(tmp_path) == ["race.gguf"]


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_vector_file(tmp_path / "no" / "such" / "dir.gguf", random_directions([1]), model_hint="llama")


# ---------------------------------------------------------------------------------------------
# Reading: bad files


def assert_read_fails(path, *patterns, layer_offset=0):
    with time_limit(10), pytest.raises(VectorFileError) as caught:
        read_vector_file(path, layer_offset=layer_offset)
    message = str(caught.value)
    assert str(path) in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError) as caught:
        read_vector_file(path)
    assert str(path) in str(caught.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_read_fails(path, "empty")


def test_directory(tmp_path):
    assert_read_fails(tmp_path, "cannot read")


def test_not_gguf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text, long enough to look like something")
    assert_read_fails(path, "not a GGUF file")


def test_model_file_is_rejected_by_architecture(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", vector_tensors("direction.1"), architecture="llama")
    assert_read_fails(path, "general.architecture is 'llama'", "'controlvector'")


def test_missing_architecture(tmp_path):
    path = write_gguf(tmp_path / "noarch.gguf", vector_tensors("direction.1"), architecture=None)
    assert_read_fails(path, "general.architecture is None")


@pytest.mark.parametrize(
    "name", ["steer.1", "direction.x", "direction.1abc", "direction.", "direction.+1", "direction"]
)
def test_badly_named_tensor(tmp_path, name):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1", name))
    assert_read_fails(path, re.escape(repr(name)), "direction.<layer>")


@pytest.mark.parametrize("name, layer", [("direction.0", "0"), ("direction.-3", "-3")])
def test_layer_below_one(tmp_path, name, layer):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.2", name))
    assert_read_fails(path, re.escape(repr(name)), f"layer {layer}")


def test_non_f32_tensor(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", [("direction.3", np.ones(N_EMBD, np.float16))])
    assert_read_fails(path, "'direction.3'", "F16")


def test_two_dimensional_tensor(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", [("direction.3", np.ones((2, N_EMBD), F32))])
    assert_read_fails(path, "'direction.3'", r"shape \[16, 2\]")


def test_unequal_lengths(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1") + vector_tensors("direction.2", n_embd=8))
    assert_read_fails(path, "'direction.2' has length 8", "'direction.1' has 16")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    vector = np.ones(N_EMBD, F32)
    vector[5] = bad
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1") + [("direction.9", vector)])
    assert_read_fails(path, "'direction.9'", "non-finite", "index 5")


def test_no_directions(tmp_path):
    assert_read_fails(write_gguf(tmp_path / "v.gguf", []), "no direction tensors")


def test_two_tensors_for_one_layer(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1", "direction.01"))
    assert_read_fails(path, "'direction.1' and 'direction.01' are both for layer 1")


def test_layer_count_mismatch_warns_but_loads(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1", "direction.2"), layer_count=5)
    with pytest.warns(VectorFileWarning, match="layer_count is 5 but the file has 2"):
        vf = read_vector_file(path)
    assert vf.layers == [1, 2]


def test_missing_layer_count_is_fine(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1"), layer_count=None)
    assert read_vector_file(path).layers == [1]


def test_missing_model_hint_warns(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1"), model_hint=None)
    with pytest.warns(VectorFileWarning, match="model_hint"):
        assert read_vector_file(path).model_hint == ""


def test_model_hint_of_wrong_type(tmp_path):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1"), model_hint=None,
                      kv=[("controlvector.model_hint", 7, GGUFValueType.UINT32, None)])
    assert_read_fails(path, "controlvector.model_hint must be a string")


def ggsteer_kv(**overrides):
    """Valid ggsteer keys for tensors direction.1 and direction.2, with some replaced or removed."""
    kv = {
        "version": (1, GGUFValueType.UINT32, None),
        "n_embd": (N_EMBD, GGUFValueType.UINT32, None),
        "layers": ([1, 2], GGUFValueType.ARRAY, GGUFValueType.INT32),
        "gap": ([1.0, 2.0], GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
    }
    kv.update(overrides)
    return [(f"ggsteer.{key}", *value) for key, value in kv.items() if value is not None]


@pytest.mark.parametrize(
    "overrides, patterns",
    [
        ({"gap": ([1.0, 2.0, 3.0], ARRAY, FLOAT32)}, ["ggsteer.gap has 3 values but there are 2 layers"]),
        ({"separation": ([1.0], ARRAY, FLOAT32)}, ["ggsteer.separation has 1 values"]),
        ({"gap": ([1.0, float("nan")], ARRAY, FLOAT32)}, ["ggsteer.gap must be", "finite"]),
        ({"layers": None}, ["need ggsteer.layers"]),
        ({"layers": ([2, 1], ARRAY, INT32)}, [r"ggsteer.layers is \[2, 1\]", r"layers \[1, 2\]"]),
        ({"n_embd": (8, GGUFValueType.UINT32, None)}, ["ggsteer.n_embd is 8"]),
        ({"method": (3, GGUFValueType.UINT32, None)}, ["ggsteer.method must be a str", "UINT32"]),
        ({"dataset_size": ("many", GGUFValueType.STRING, None)}, ["ggsteer.dataset_size must be a uint32", "STRING"]),
        ({"dataset_size": (-5, GGUFValueType.INT32, None)}, ["ggsteer.dataset_size must be a uint32"]),
        ({"layers": (["1", "2"], ARRAY, GGUFValueType.STRING)}, ["ggsteer.layers must be", "ARRAY of STRING"]),
        ({"recommended_layers": ([3], ARRAY, INT32)}, [r"recommended_layers has layers \[3\]"]),
        ({"n_layer": (2, GGUFValueType.UINT32, None)}, ["ggsteer.n_layer is 2 but layer 2 has a direction"]),
    ],
)
def test_bad_ggsteer_metadata(tmp_path, overrides, patterns):
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1", "direction.2"), kv=ggsteer_kv(**overrides))
    assert_read_fails(path, *patterns)


def test_unknown_ggsteer_keys_are_kept_and_newer_version_warns(tmp_path):
    kv = ggsteer_kv(version=(FORMAT_VERSION + 1, GGUFValueType.UINT32, None), future=("x", GGUFValueType.STRING, None))
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1", "direction.2"), kv=kv)
    with pytest.warns(VectorFileWarning, match="newer"):
        vf = read_vector_file(path)
    assert vf.metadata["future"] == "x" and vf.source == "ggsteer"
    assert "other ggsteer.future" in describe_vector_file(vf)


def test_metadata_integers_and_doubles_of_other_widths_are_accepted(tmp_path):
    kv = ggsteer_kv(
        n_embd=(N_EMBD, GGUFValueType.UINT64, None),
        gap=([1.5, 2.5], GGUFValueType.ARRAY, GGUFValueType.FLOAT64),
    )
    path = write_gguf(tmp_path / "v.gguf", vector_tensors("direction.1", "direction.2"), kv=kv)
    assert read_vector_file(path).metadata["gap"] == [1.5, 2.5]


# ---------------------------------------------------------------------------------------------
# Reading: corrupted headers (gguf.GGUFReader alone would hang or read garbage on some of these)


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


ARCH_KV = gguf_string(b"general.architecture") + struct.pack("<I", 8) + gguf_string(b"controlvector")


def tensor_info(name: bytes, dims, ggml_type=0, offset=0) -> bytes:
    shape = struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
    return gguf_string(name) + shape + struct.pack("<IQ", ggml_type, offset)


CORRUPTED_HEADERS = {
    "array length past the end": (
        header(0, 2) + ARCH_KV + gguf_string(b"ggsteer.gap") + struct.pack("<IIQ", 9, 6, 2**40) + bytes(12),
        "items of 'ggsteer.gap'"),
    "array length a little too long": (
        header(0, 2) + ARCH_KV + gguf_string(b"ggsteer.gap") + struct.pack("<IIQ", 9, 6, 10) + bytes(12),
        "items of 'ggsteer.gap'"),
    "string array length past the end": (
        header(0, 2) + ARCH_KV + gguf_string(b"k") + struct.pack("<IIQ", 9, 8, 2**62) + bytes(40),
        "'k' item count"),
    "huge string length": (
        header(0, 1) + gguf_string(b"general.architecture") + struct.pack("<IQ", 8, 2**50) + b"controlvector",
        "value of 'general.architecture'"),
    "huge key length": (header(0, 1) + struct.pack("<Q", 2**63) + b"general", "metadata key"),
    "huge metadata count": (header(0, 2**60) + ARCH_KV, "metadata count"),
    "huge tensor count": (header(2**62, 1) + ARCH_KV, "tensor count"),
    "unknown value type": (
        header(0, 2) + ARCH_KV + gguf_string(b"k") + struct.pack("<I", 99) + bytes(16), "unknown value type 99"),
    "nested array": (
        header(0, 2) + ARCH_KV + gguf_string(b"k") + struct.pack("<IIQ", 9, 9, 1) + bytes(16), "array of arrays"),
    "bad alignment": (
        header(0, 2) + ARCH_KV + gguf_string(b"general.alignment") + struct.pack("<II", 4, 3), "general.alignment"),
    "too many dimensions": (header(1, 1) + ARCH_KV + tensor_info(b"direction.1", [1] * 7), "7 dimensions"),
    "unknown tensor type": (
        header(1, 1) + ARCH_KV + tensor_info(b"direction.1", [4], ggml_type=200) + bytes(64), "unknown type 200"),
    "tensor data past the end": (
        header(1, 1) + ARCH_KV + tensor_info(b"direction.1", [2**40, 2**40]) + bytes(64), "runs past the end"),
    "tensor offset past the end": (
        header(1, 1) + ARCH_KV + tensor_info(b"direction.1", [4], offset=2**63) + bytes(64),
        f"has data offset {2**63}, expected 0"),
    "tensors not back to back": (
        header(2, 1) + ARCH_KV + tensor_info(b"direction.1", [4]) + tensor_info(b"direction.2", [4], offset=16)
        + bytes(96),
        "'direction.2' has data offset 16, expected 32"),
    "last tensor's padding missing": (
        header(1, 1) + ARCH_KV + tensor_info(b"direction.1", [4]) + bytes(16), "'direction.1' runs past the end"),
    "tensor name too long": (
        header(1, 1) + ARCH_KV + tensor_info(b"direction." + b"1" * 60, [4]) + bytes(64), "longer than ggml's limit"),
    "empty key": (header(0, 2) + ARCH_KV + gguf_string(b"") + struct.pack("<IB", 0, 1), "a metadata key is empty"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + bytes(32), "big-endian"),
    "version 1": (header(0, 0, version=1) + bytes(16), "version 1"),
    "wrong magic": (b"GGML" + bytes(40), "not a GGUF file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTED_HEADERS))
def test_corrupted_header(tmp_path, case):
    content, pattern = CORRUPTED_HEADERS[case]
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(content)
    started = time.monotonic()
    assert_read_fails(path, re.escape(pattern))
    assert time.monotonic() - started < 2


def test_truncated_anywhere_is_an_error(ggsteer_file):
    content = ggsteer_file.read_bytes()
    tensor_data_start = len(content) - 3 * N_EMBD * 4
    for length in sorted({0, 1, 3, 4, 8, 23, 24, 40, 100, tensor_data_start - 1, tensor_data_start, len(content) - 1}):
        ggsteer_file.write_bytes(content[:length])
        assert_read_fails(ggsteer_file)


# ---------------------------------------------------------------------------------------------
# Copies, not views: the file can be replaced (and is unmapped) after reading


def test_arrays_are_copies_and_file_is_unmapped(ggsteer_file, tmp_path):
    vf = read_vector_file(ggsteer_file)
    for vector in vf.directions.values():
        assert vector.flags.writeable and vector.flags.owndata
        assert not isinstance(vector.base, np.memmap)
    if sys.platform.startswith("linux"):
        assert not file_is_mapped(ggsteer_file)
    before = vf.directions[1].copy()
    replacement = tmp_path / "replacement.gguf"
    write_vector_file(replacement, random_directions([1], seed=42), model_hint="llama")
    os.replace(replacement, ggsteer_file)
    assert np.array_equal(vf.directions[1], before)
    assert read_vector_file(ggsteer_file).model_hint == "llama"


DUPLICATE_TENSORS = (
    header(2, 1) + ARCH_KV + tensor_info(b"direction.1", [4]) + tensor_info(b"direction.1", [4], offset=32) + bytes(96)
)
DUPLICATE_KEYS = header(0, 2) + ARCH_KV + ARCH_KV


@pytest.mark.parametrize(
    "content, pattern",
    [(DUPLICATE_TENSORS, "duplicated tensor"), (DUPLICATE_KEYS, "Duplicate general.architecture")],
    ids=["duplicate tensors", "duplicate keys"],
)
def test_errors_inside_gguf_reader_are_wrapped(tmp_path, content, pattern):
    path = tmp_path / "dup.gguf"
    path.write_bytes(content)
    assert_read_fails(path, "malformed GGUF file", pattern)


def nan_file(path):
    vector = np.ones(N_EMBD, F32)
    vector[0] = np.nan  # only found after gguf's reader has mapped the file
    return write_gguf(path, [("direction.1", vector)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def duplicate_tensors_file(path):
    path.write_bytes(DUPLICATE_TENSORS)  # refused inside gguf's reader


@pytest.mark.parametrize("make_file", [nan_file, duplicate_tensors_file], ids=["NaN", "reader error"])
def test_file_is_unmapped_after_a_failed_read(tmp_path, make_file):
    path = tmp_path / "bad.gguf"
    make_file(path)
    with pytest.raises(VectorFileError) as caught:
        read_vector_file(path)
    assert not file_is_mapped(path)
    del caught


# ---------------------------------------------------------------------------------------------
# describe_vector_file


def test_describe_ggsteer_file(ggsteer_file):
    vf = read_vector_file(ggsteer_file)
    text = describe_vector_file(vf)
    assert "model hint:  gemma3" in text
    assert "source:      ggsteer (format version 1)" in text
    assert "n_embd:      16" in text
    assert "layers:      3 (1, 4, 7)" in text
    assert "method:      pca_diff" in text
    assert "recommended layers:   4, 7" in text
    header_line = next(line for line in text.splitlines() if line.strip().startswith("layer "))
    assert header_line.split() == ["layer", "norm", "separation", "gap", "residual", "norm", "center", "ablation",
                                   "center", "ablation", "gap", "stability", "consistency"]
    row = next(line for line in text.splitlines() if line.split()[:1] == ["4"]).split()
    assert float(row[1]) == pytest.approx(np.linalg.norm(vf.directions[4]), rel=1e-3)
    assert [float(value) for value in row[2:]] == pytest.approx([0.83, 2.5, 45.6, 0.25, 0.5, 2.0, 0.99, 0.2], rel=1e-3)
    # medians at the recommended layers 4 and 7, and no warning: their differences are consistent
    assert "stability:   0.9945 from 96 pairs" in text and "consistency: 0.325" in text
    assert "unlikely to steer" not in text


def test_describe_external_file_and_layer_ranges(tmp_path):
    path = tmp_path / "ext.gguf"
    write_like_repeng(str(path), random_directions([1, 2, 3, 5, 8, 9]), "mistral")
    text = describe_vector_file(read_vector_file(path))
    assert "layers:      6 (1-3, 5, 8-9)" in text
    assert "source:      external" in text and "separation" not in text


# ---------------------------------------------------------------------------------------------
# Fuzzing: a damaged file gives VectorFileError (or loads), never another exception or a hang


@pytest.fixture(scope="module")
def fuzz_seed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "seed.gguf"
    per_layer = {"separation": [0.5, 0.25, 0.125], "gap": [1.0, 2.0, 3.0], "residual_norm": [4.0, 5.0, 6.0],
                 "ablation_direction": [0.25] * 24}
    metadata = {**full_metadata(), **per_layer}
    write_vector_file(path, random_directions([1, 4, 7], n_embd=8), model_hint="llama", metadata=metadata)
    return path


def truncated(length: int):
    return lambda data: data[:length]


def flipped(at: int, mask: int):
    return lambda data: data[:at] + bytes([data[at] ^ mask]) + data[at + 1:] if at < len(data) else data


def inserted(at: int, garbage: bytes):
    return lambda data: data[:at] + garbage + data[at:]


def overwritten(at: int, number: int):
    return lambda data: data[:at] + struct.pack("<Q", number) + data[at + 8:]


def mutation(size: int):
    """One way of damaging a file of `size` bytes, as a function of its bytes."""
    # Huge or off-by-some numbers written over what may be a count, a length or an offset.
    numbers = st.sampled_from([2**64 - 1, 2**63, 2**40, 2**32 + 1, 2**31, 10**6, 255, 7, 0])
    return st.one_of(
        st.builds(truncated, st.integers(0, size - 1)),
        st.builds(flipped, st.integers(0, size - 1), st.integers(1, 255)),
        st.builds(inserted, st.integers(0, size), st.binary(min_size=1, max_size=64)),
        st.builds(overwritten, st.integers(0, size - 8), numbers),
    )


@pytest.fixture(scope="module")
def ggml_if_available() -> GgmlC | None:
    return load_ggml()


def assert_llama_cpp_loads_the_same(ggml: GgmlC, path, vf: VectorFile) -> None:
    loaded = llama_cpp_load_control_vector(ggml, path)
    assert loaded is not None, "ggsteer accepted a file llama.cpp rejects"
    n_embd, buffer = loaded
    assert n_embd == vf.n_embd and buffer.size == max(vf.layers) * n_embd
    for layer in range(1, max(vf.layers) + 1):
        expected = vf.directions.get(layer, np.zeros(n_embd, dtype=F32))
        assert np.array_equal(buffer[(layer - 1) * n_embd: layer * n_embd], expected)


@settings(max_examples=300, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_damaged_files(fuzz_seed_file, ggml_if_available, data):
    original = fuzz_seed_file.read_bytes()
    damaged = original
    for damage in data.draw(st.lists(mutation(len(original)), min_size=1, max_size=4)):
        damaged = damage(damaged)
    path = fuzz_seed_file.with_name("damaged.gguf")
    path.write_bytes(damaged)
    with time_limit(10), warnings.catch_warnings():
        warnings.simplefilter("ignore", VectorFileWarning)
        try:
            vf = read_vector_file(path)
        except (VectorFileError, FileNotFoundError) as error:
            assert str(path) in str(error)
            return
    # A damaged file that still parses must still be a valid control vector.
    lengths = {len(vector) for vector in vf.directions.values()}
    assert len(lengths) == 1 and all(layer >= 1 for layer in vf.directions)
    assert all(vector.dtype == F32 and np.isfinite(vector).all() for vector in vf.directions.values())
    describe_vector_file(vf)
    if ggml_if_available is not None:  # whatever ggsteer accepts, llama.cpp loads to the same numbers
        assert_llama_cpp_loads_the_same(ggml_if_available, path, vf)



# ---------------------------------------------------------------------------------------------
# Size bounds at load: a finite but huge direction is refused unless the caller overrides


def control_vector_file(path, value: float, residual_norm: float | None = None, n_embd: int = N_EMBD) -> Path:
    from ggsteer.vectors import ControlVector

    directions = {il: np.full(n_embd, value, F32) for il in (1, 2)}
    metadata = {"unit": "gap", "gap": [1.0, 1.0]} if residual_norm is None else {
        "unit": "gap", "gap": [1.0, 1.0], "residual_norm": [residual_norm, residual_norm]}
    ControlVector(directions, "llama", metadata).save(path)
    return path


@pytest.mark.parametrize("value", [3e38, 1e30, -2e6])
def test_huge_values_are_refused_at_load_naming_file_layer_and_override(tmp_path, value, monkeypatch):
    from ggsteer.vectors import ControlVector, VectorTooLargeError

    monkeypatch.delenv("GGSTEER_ALLOW_LARGE_VECTORS", raising=False)
    path = control_vector_file(tmp_path / "poisoned.gguf", value)
    with pytest.raises(VectorTooLargeError, match=r"poisoned\.gguf: direction\.1 holds a value of .*allow_large=True"):
        ControlVector.load(path)
    loaded = ControlVector.load(path, allow_large=True)  # the explicit override
    assert float(loaded.directions[2][0]) == float(F32(value))
    monkeypatch.setenv("GGSTEER_ALLOW_LARGE_VECTORS", "1")  # the CLI's and server's override
    assert ControlVector.load(path).layers == [1, 2]


def test_a_direction_far_beyond_the_stored_residual_norm_is_refused(tmp_path, monkeypatch):
    from ggsteer.vectors import ControlVector, VectorTooLargeError

    monkeypatch.delenv("GGSTEER_ALLOW_LARGE_VECTORS", raising=False)
    # norm 100 * 4 = 400: 40 times a residual norm of 10, below the absolute bound
    far = control_vector_file(tmp_path / "far.gguf", 100.0, residual_norm=10.0)
    with pytest.raises(VectorTooLargeError,
                       match=r"direction\.1 has norm 400, 40 times the layer's stored residual norm 10"):
        ControlVector.load(far)
    near = control_vector_file(tmp_path / "near.gguf", 20.0, residual_norm=10.0)  # 8 times: allowed
    assert ControlVector.load(near).layers == [1, 2]
    unknown = control_vector_file(tmp_path / "unknown.gguf", 100.0)  # no residual norm stored: only the absolute bound
    assert ControlVector.load(unknown).layers == [1, 2]


@pytest.mark.filterwarnings("ignore::ggsteer.train.extract.TrainingWarning")  # separation is not what is tested
def test_trained_vectors_pass_the_size_rule(tiny_model, tmp_path, monkeypatch):
    from ggsteer.train import make_dataset
    from ggsteer.vectors import ControlVector
    from ggsteer.vectors.bounds import MAX_RESIDUAL_RATIO

    monkeypatch.delenv("GGSTEER_ALLOW_LARGE_VECTORS", raising=False)
    pairs = make_dataset("i am very {persona} and", ["happy", "good"], ["sad", "bad"],
                         ["i feel", "the dog is", "today"])
    for method in ("mean_diff", "pca_diff"):
        trained = ControlVector.train(tiny_model, pairs, method=method)
        trained.save(tmp_path / f"{method}.gguf")
        loaded = ControlVector.load(tmp_path / f"{method}.gguf")
        norms = loaded.layer_stat("residual_norm")
        assert norms, "the trained file stores residual norms: the relative rule applies to it"
        ratios = [float(np.linalg.norm(loaded.directions[il])) / norms[il] for il in loaded.layers]
        assert max(ratios) < MAX_RESIDUAL_RATIO


def test_the_cli_refuses_a_huge_vector_before_the_model_loads(tmp_path, tiny_model_path, capsys, monkeypatch):
    import ggsteer.cli.generate
    from ggsteer.cli import main

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ggsteer.cli.generate, "load_model", load_model)
    monkeypatch.delenv("GGSTEER_ALLOW_LARGE_VECTORS", raising=False)
    path = control_vector_file(tmp_path / "poisoned.gguf", 1e30, n_embd=48)
    code = main(["generate", "--model", str(tiny_model_path), "--vector", f"{path}:1", "-p", "the cat", "-n", "2",
                 "--threads", "2"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(error) == 1 and "poisoned.gguf: direction.1 holds a value of 1e+30" in error[0]
    assert "GGSTEER_ALLOW_LARGE_VECTORS=1" in error[0]
