"""The hook's bookkeeping per decode: each steered layer visited exactly once, errors kept with
the call that caused them, kernel applications counted per backend path.

The first tests hand real ggml tensors (in a CPU backend buffer) to the hook's C callback the way
ggml's scheduler does, so graphs llama.cpp does not build (a layer named twice, a layer missing)
can be tried; the others run the tiny llama model.
"""

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from support.oracle import last_logits, random_vector

from ggsteer import SteeredModel
from ggsteer.runtime.batch import OwnedBatch
from ggsteer.runtime.native import native as load_native
from ggsteer.vectors import ControlVector

native = load_native()

pytestmark = pytest.mark.usefixtures("unsteered_tiny_model")

N_EMBD = 8
N_ROWS = 4
GGML_TYPE_F32 = 0


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml():
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_init.argtypes, lib.ggml_init.restype = [_InitParams], ctypes.c_void_p
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_new_tensor_2d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.ggml_new_tensor_2d.restype = ctypes.c_void_p
    lib.ggml_set_name.argtypes, lib.ggml_set_name.restype = [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p
    lib.ggml_get_data.argtypes, lib.ggml_get_data.restype = [ctypes.c_void_p], ctypes.c_void_p
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    lib.ggml_backend_alloc_ctx_tensors_from_buft.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_backend_alloc_ctx_tensors_from_buft.restype = ctypes.c_void_p
    lib.ggml_backend_buffer_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


class FakeGraph:
    """F32 tensors [N_ROWS, N_EMBD] with the given names, in a CPU backend buffer."""

    def __init__(self, names, seed=0):
        self.lib = _ggml()
        overhead = self.lib.ggml_tensor_overhead() * (len(names) + 1)
        self.ctx = self.lib.ggml_init(_InitParams(overhead, None, True))
        self.tensors = []
        for name in names:
            tensor = self.lib.ggml_new_tensor_2d(self.ctx, GGML_TYPE_F32, N_EMBD, N_ROWS)
            self.lib.ggml_set_name(tensor, name.encode())
            self.tensors.append(tensor)
        self.buffer = self.lib.ggml_backend_alloc_ctx_tensors_from_buft(self.ctx,
                                                                        self.lib.ggml_backend_cpu_buffer_type())
        rng = np.random.default_rng(seed)
        for i in range(len(names)):
            self.rows(i)[:] = rng.normal(size=(N_ROWS, N_EMBD))

    def rows(self, i) -> np.ndarray:
        pointer = self.lib.ggml_get_data(self.tensors[i])
        return np.ctypeslib.as_array((ctypes.c_float * (N_ROWS * N_EMBD)).from_address(pointer)).reshape(N_ROWS, N_EMBD)

    def run(self, hook) -> None:
        """What ggml_backend_sched_compute_splits does with an eval callback: ask, then show."""
        callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(
            hook.callback_address)
        for tensor in self.tensors:
            if callback(tensor, True, hook.user_data_address):
                assert callback(tensor, False, hook.user_data_address)

    def close(self) -> None:
        self.lib.ggml_backend_buffer_free(self.buffer)
        self.lib.ggml_free(self.ctx)


@pytest.fixture
def add_at_layer_1():
    """A hook for 2 layers that adds 1.0 to every row of layer 1."""
    hook = native.Hook(2, N_EMBD)
    ops = np.array([[0, 1, -1, 0, -1, -1, 1, 0]], np.int32)  # add, layer 1, every row, always, sink included
    empty = np.zeros(0)
    hook.set_program(ops, np.ones(1), np.zeros(1), empty, empty, empty, np.ones(N_EMBD, np.float32), 1)
    return hook


def describe_rows(hook) -> None:
    hook.set_rows(np.zeros(N_ROWS), np.arange(N_ROWS), np.zeros(N_ROWS), np.array([N_ROWS - 1]))


def decode(hook, names, describe=True):
    """One decode over a graph with these node names; returns (error, rows before, rows after)."""
    graph = FakeGraph(names)
    try:
        before = [graph.rows(i).copy() for i in range(len(names))]
        if describe:
            describe_rows(hook)
        graph.run(hook)
        if describe:
            hook.clear_rows()
        after = [graph.rows(i).copy() for i in range(len(names))]
    finally:
        graph.close()
    return hook.take_error(), before, after


def test_layer_seen_once_is_steered_once(add_at_layer_1):
    error, before, after = decode(add_at_layer_1, ["attn_norm-1", "l_out-0", "l_out-1"])
    assert error == ""
    np.testing.assert_array_equal(after[2], before[2] + 1.0)
    np.testing.assert_array_equal(after[:2], before[:2])
    assert add_at_layer_1.counts() == dict(host_kernel=1, cuda_kernel=0, copy_path=0, row_transfers=0)


def test_layer_named_twice_is_an_error(add_at_layer_1):
    error, _, _ = decode(add_at_layer_1, ["l_out-0", "l_out-1", "l_out-1"])
    assert error == "layer 1: the graph had 2 nodes named l_out-1 in this decode, expected exactly 1"


def test_layer_missing_from_the_graph_is_an_error(add_at_layer_1):
    error, _, after = decode(add_at_layer_1, ["l_out-0", "attn_norm-1"])
    assert error == "layer 1: the graph had 0 nodes named l_out-1 in this decode, expected exactly 1"
    assert add_at_layer_1.counts()["host_kernel"] == 0


def test_decode_that_never_computed_has_no_layer_error(add_at_layer_1):
    # llama_decode can fail (KV cache full) before its graph runs: that status is the error
    assert decode(add_at_layer_1, [])[0] == ""


def test_undescribed_decode_errors_without_steering(add_at_layer_1):
    error, before, after = decode(add_at_layer_1, ["l_out-1"], describe=False)
    assert "a decode ggsteer did not describe" in error and "l_out-1" in error
    np.testing.assert_array_equal(after[0], before[0])


def test_undescribed_decode_error_is_not_the_next_decodes(add_at_layer_1):
    graph = FakeGraph(["l_out-1"])
    try:
        graph.run(add_at_layer_1)  # nobody takes this decode's error
    finally:
        graph.close()
    error, before, after = decode(add_at_layer_1, ["l_out-0", "l_out-1"])
    assert error == ""
    np.testing.assert_array_equal(after[1], before[1] + 1.0)


# -- the tiny model -------------------------------------------------------------------------


def test_steered_layer_the_graph_lacks_names_architecture_and_layer(tiny_model_path, monkeypatch):
    """An architecture whose graph has no l_out node for a layer would steer nothing there."""
    from support.models import TIGHT_LLAMA_KWARGS

    real = llama_cpp.llama_model_n_layer
    monkeypatch.setattr(llama_cpp, "llama_model_n_layer", lambda model: real(model) + 1)
    model = SteeredModel(tiny_model_path, n_ctx=64, n_batch=32, n_seq_max=2, **TIGHT_LLAMA_KWARGS)
    monkeypatch.undo()
    try:
        missing = model.n_layer - 1
        vector = ControlVector({1: np.ones(model.n_embd, np.float32), missing: np.ones(model.n_embd, np.float32)},
                               "llama")
        model.set_control(vector, 1.0, op="ablate", layers=[1, missing])
        message = rf"ggsteer hook \(llama architecture\): layer {missing}: the graph had 0 nodes named l_out-{missing}"
        with pytest.raises(RuntimeError, match=message):
            model.eval(model.tokenize_prompt("the happy dog"))
        with pytest.raises(RuntimeError, match=message):
            ablate = model.intervention(vector, 1.0, op="ablate", layers=[1, missing])
            model.generate_batch(["the happy dog"], [[ablate]], max_tokens=2)
    finally:
        model.close()


def raw_decode(model, text):
    """llama_decode straight on the context, as code that bypasses ggsteer would."""
    tokens = model.tokenize_prompt(text)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(model.ctx), True)
    try:
        with OwnedBatch(len(tokens)) as batch:
            for i, token in enumerate(tokens):
                batch.add(token, i, 0, i == len(tokens) - 1)
            assert llama_cpp.llama_decode(model.ctx, batch.batch) == 0
    finally:
        model.reset()


def test_bypassing_decode_does_not_fail_the_next_call(tiny_model):
    tiny_model.set_control(random_vector(tiny_model, 61, scale=3.0), 1.0, layers=[1, 2], op="ablate")
    steered = last_logits(tiny_model)
    raw_decode(tiny_model, "a sad cat")
    np.testing.assert_array_equal(last_logits(tiny_model), steered)


def test_embed_raises_its_own_hook_error(tiny_model_path):
    from support.models import TIGHT_LLAMA_KWARGS

    model = SteeredModel(tiny_model_path, n_ctx=64, n_batch=32, n_seq_max=2, embedding=True, **TIGHT_LLAMA_KWARGS)
    try:
        unsteered = np.asarray(model.embed("the happy dog"))
        model.set_control(random_vector(model, 62, scale=3.0), 1.0, layers=[1, 2], op="ablate")
        with pytest.raises(RuntimeError, match=r"\(llama architecture\): a decode ggsteer did not describe"):
            model.embed("the happy dog")
        steered = model.create_completion("the happy", max_tokens=4, temperature=0)["choices"][0]["text"]
        model.reset_control()
        np.testing.assert_array_equal(np.asarray(model.embed("the happy dog")), unsteered)
        with model.steer(random_vector(model, 62, scale=3.0), 1.0, layers=[1, 2], op="ablate"):
            again = model.create_completion("the happy", max_tokens=4, temperature=0)["choices"][0]["text"]
        assert again == steered
    finally:
        model.close()
