"""The llama.cpp context that carries ggsteer's eval callback, and decodes that brief the hook.

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
import numpy as np
from llama_cpp import _internals

from ggsteer.runtime.native import native


class HookError(RuntimeError):
    """The eval callback refused a decode (a layer seen twice, a bad row plan, ...)."""


def new_hook(n_layer: int, n_embd: int):
    """The native hook state for a model of this shape (see `ggsteer._native.Hook`)."""
    return native().Hook(n_layer, n_embd)


def install_hooked_context(llama: llama_cpp.Llama, hook, n_seq_max: int) -> None:
    """Replace `llama`'s context by one whose eval callback is `hook`."""
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


def is_end_of_generation(llama: llama_cpp.Llama, token: int) -> bool:
    return bool(llama_cpp.llama_token_is_eog(llama._model.vocab, token))


def decode_batch(ctx, hook, batch, generated=False, architecture: str = "unknown") -> None:
    """llama_decode on a filled llama_batch, describing its rows to the hook first.

    Rows are taken from the batch itself: slot = sequence id, position, outputs where logits
    are requested; `generated` (bool or per-row array) marks generated tokens.
    """
    n = batch.n_tokens
    positions = np.ctypeslib.as_array(batch.pos, shape=(n,)).astype(np.int32)
    slots = np.array([batch.seq_id[i][0] for i in range(n)], dtype=np.int32)
    outputs = np.flatnonzero(np.ctypeslib.as_array(batch.logits, shape=(n,))).astype(np.int32)
    flags = np.broadcast_to(np.asarray(generated, dtype=np.uint8), (n,))
    hook.set_rows(slots, positions, np.ascontiguousarray(flags), outputs)
    try:
        status = llama_cpp.llama_decode(ctx, batch)
    finally:
        hook.clear_rows()
    error = hook.take_error()
    if status != 0 or error:
        detail = (f": ggsteer hook ({architecture} architecture): {error}" if error
                  else " (status 1: the KV cache is full; raise n_ctx or use smaller batches)")
        raise HookError(f"llama_decode failed with status {status}{detail}")
