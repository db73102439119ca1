"""The llama.cpp context that carries ggsteer's eval callback (used through runtime.context.Context).

llama.cpp takes `cb_eval` only when a context is created, and `llama_cpp.Llama` does not pass one.
So after `Llama.__init__` has built its model and first context, `install_hooked_context` frees
that context, sets `cb_eval`/`cb_eval_user_data` (and the batch settings capture needs) on
`llama.context_params` and creates the context the `Llama` uses from then on. Freeing first keeps
only one KV cache and compute buffer alive at a time (a large n_ctx on a GPU could not hold two).
This module and its siblings in runtime/ are the only code that touches llama_cpp's internals.
"""

from __future__ import annotations

import contextlib
import ctypes

import llama_cpp
from llama_cpp import _internals

from ggsteer.runtime.context import Context, HookError
from ggsteer.runtime.native import native

__all__ = ["HookError", "install_hooked_context", "is_end_of_generation", "max_parallel_sequences",
           "model_dimensions", "new_hook"]


def max_parallel_sequences() -> int:
    """The most sequences one llama.cpp context can hold (n_seq_max's upper bound)."""
    return int(llama_cpp.llama_max_parallel_sequences())


def model_dimensions(llama: llama_cpp.Llama) -> tuple[int, int]:
    """(n_layer, n_embd) of a loaded model."""
    return int(llama_cpp.llama_model_n_layer(llama.model)), int(llama_cpp.llama_model_n_embd(llama.model))


def new_hook(n_layer: int, n_embd: int):
    """The native hook state for a model of this shape (see `ggsteer._native.Hook`)."""
    return native().Hook(n_layer, n_embd)


def install_hooked_context(llama: llama_cpp.Llama, hook, n_seq_max: int, architecture: str = "unknown") -> Context:
    """Replace `llama`'s context by one whose eval callback is `hook`; returns ggsteer's handle on it."""
    params = llama.context_params
    params.n_seq_max = n_seq_max
    # llama.cpp reserves logits for max(outputs, n_seq_max) rows and asserts that fits n_outputs_max
    # (default n_batch): more live sequences than batch rows would abort the process
    params.n_outputs_max = max(params.n_batch, n_seq_max)
    # one KV pool shared by all sequences: prefix copies are free and batches split in order
    params.kv_unified = True
    callback = llama_cpp.ggml_backend_sched_eval_callback(hook.callback_address)
    params.cb_eval = callback
    params.cb_eval_user_data = ctypes.c_void_p(hook.user_data_address)
    llama._ctx.close()
    llama._ctx = llama._stack.enter_context(
        contextlib.closing(_internals.LlamaContext(model=llama._model, params=params, verbose=llama.verbose))
    )
    # ctypes must keep the callback object alive as long as the context
    llama._stack.callback(lambda: callback)
    if llama._lora_adapter is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llama._lora_adapter)
        scales = (ctypes.c_float * 1)(llama.lora_scale)
        if llama_cpp.llama_set_adapters_lora(llama.ctx, adapters, 1, scales):
            raise RuntimeError(f"failed to set LoRA adapter {llama.lora_path} on the hooked context")
    llama.reset()
    return Context(llama._ctx, hook, llama.n_vocab(), architecture)


def is_end_of_generation(llama: llama_cpp.Llama, token: int) -> bool:
    return bool(llama_cpp.llama_token_is_eog(llama._model.vocab, token))
