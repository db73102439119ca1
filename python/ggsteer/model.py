"""SteeredModel: a llama_cpp.Llama whose context carries ggsteer's native eval callback.

How the callback gets in (no patching of llama_cpp): `Llama.__init__` builds the model and a
context from `self.context_params`. llama.cpp only takes `cb_eval` when a context is created, so
SteeredModel lets `Llama` finish, then sets `cb_eval`/`cb_eval_user_data` (and the batch settings
capture needs) on `self.context_params` and replaces `self._ctx` with a new
`llama_cpp._internals.LlamaContext` made from them, freeing the first one. Everything else
(`__call__`, `create_completion`, `create_chat_completion`, tokenizer, sampler) is Llama's own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import warnings
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp import _internals

from ggsteer._native_check import native
from ggsteer.default_model import default_model_path

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512
# Sequences decoded side by side during capture; llama.cpp allows at most 256.
DEFAULT_N_SEQ_MAX = 64


def check_model_path(model_path: str | os.PathLike) -> Path:
    """Fail early, naming the file, on a missing or non-GGUF model."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    if not path.is_file():
        raise ValueError(f"model path is not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"not a GGUF model file (bad magic {magic!r}): {path}")
    return path


class SteeredModel(llama_cpp.Llama):
    """A `llama_cpp.Llama` that ggsteer can read and steer.

    `model_path=None` opens the embedded default model (Gemma 3 270M Q4_K_M). Other keyword
    arguments pass through to `Llama` (`n_gpu_layers`, `n_threads`, `n_ctx`, `verbose`, ...).
    `n_seq_max` bounds how many prompts run side by side in one decode.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_batch: int = DEFAULT_N_BATCH,
        n_seq_max: int = DEFAULT_N_SEQ_MAX,
        verbose: bool = False,
        **llama_kwargs,
    ):
        path = check_model_path(default_model_path() if model_path is None else model_path)
        if not 1 <= n_seq_max <= llama_cpp.llama_max_parallel_sequences():
            raise ValueError(
                f"n_seq_max={n_seq_max} must be between 1 and {llama_cpp.llama_max_parallel_sequences()}"
            )
        # one ubatch per decode keeps the callback's batch rows equal to ours
        llama_kwargs["n_ubatch"] = n_batch
        super().__init__(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, verbose=verbose, **llama_kwargs)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model.model)
        self._hook = native.Hook(self.n_layer, self.n_embd)
        self._controls: list = []
        self._generating = False
        self._generated_from: int | None = None  # first cached position evaluated as a generated token
        self._replace_context_with_hooked(n_seq_max)

    def _replace_context_with_hooked(self, n_seq_max: int) -> None:
        params = self.context_params
        params.n_seq_max = n_seq_max
        # one KV pool shared by all sequences: prefix copies are free and batches split in order
        params.kv_unified = True
        self._cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self._hook.callback_address)
        params.cb_eval = self._cb_eval
        params.cb_eval_user_data = ctypes.c_void_p(self._hook.user_data_address)
        old_ctx = self._ctx
        self._ctx = self._stack.enter_context(
            contextlib.closing(_internals.LlamaContext(model=self._model, params=params, verbose=self.verbose))
        )
        old_ctx.close()
        if self._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora_adapter)
            scales = (ctypes.c_float * 1)(self.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise RuntimeError(f"failed to set LoRA adapter {self.lora_path} on the hooked context")
        self.reset()

    def close(self) -> None:
        # __init__ may fail on a bad path before Llama has built anything to close
        if hasattr(self, "_stack"):
            super().close()

    @property
    def n_seq_max(self) -> int:
        return llama_cpp.llama_n_seq_max(self._ctx.ctx)

    @property
    def model_hint(self) -> str:
        """The architecture name llama.cpp uses for this model (e.g. "gemma3")."""
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def model_name(self) -> str:
        return str(self.metadata.get("general.name", Path(self.model_path).stem))

    # -- steering -------------------------------------------------------------------------
    def set_control(
        self,
        vector,
        strength: float | None = None,
        *,
        layers=None,
        raw: bool = False,
        op: str = "add",
        when: str = "all",
        first_k: int | None = None,
        condition=None,
        skip_first: int | None = None,
    ) -> None:
        """Steer every following generation.

        `vector` is a ControlVector (with `strength`, default its recommended strength or 1.0) or a
        list of `(vector, strength)` pairs, summed. Strength 1.0 is the trained mean gap between
        positive and negative activations at each layer; `raw=True` makes it a plain coefficient.
        `layers` defaults to the vector's recommended layers. `op` is "add", "ablate", "clamp" or
        "add_normalized"; `when` is "all", "prompt" or "generated"; `first_k` limits steering to the
        first k positions; `condition=(vector, threshold, layer)` steers only prompts whose mean state
        at `layer` has at least that cosine with the condition vector; `skip_first=k` leaves positions < k
alone (ablate and clamp leave the attention sink, position 0, alone by default). Plain addition on every token
        goes through llama.cpp's adapter (no cost); the rest runs in ggsteer's native hook.
        """
        from ggsteer.interventions import make_intervention

        pairs = vector if isinstance(vector, (list, tuple)) else [(vector, strength)]
        items = []
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError("set_control takes a ControlVector or a list of (ControlVector, strength) pairs")
            vec, value = pair
            if value is None:
                value = getattr(vec, "recommended_strength", None) or 1.0
            items.append(make_intervention(vec, value, self.n_layer, self.n_embd, op=op, layers=layers, raw=raw,
                                           when=when, first_k=first_k, condition=condition, skip_first=skip_first))
        self._apply_controls(items)

    def intervention(self, vector, strength: float = 1.0, **options):
        """One Intervention for this model (see set_control for the options), to combine with others."""
        from ggsteer.interventions import make_intervention

        return make_intervention(vector, strength, self.n_layer, self.n_embd, **options)

    def set_interventions(self, items) -> None:
        """Steer with several Interventions at once (e.g. add one vector while ablating another)."""
        from ggsteer.interventions import Intervention

        items = list(items)
        for item in items:
            if not isinstance(item, Intervention):
                raise TypeError(f"expected Intervention objects (model.intervention(...)), got {type(item).__name__}")
        self._apply_controls(items)

    def reset_control(self) -> None:
        """Back to the unsteered model."""
        self._apply_controls([])

    @property
    def controls(self) -> list:
        return list(self._controls)

    @contextlib.contextmanager
    def steer(self, vector, strength: float | None = None, **options):
        """`with model.steer(vector, 0.5): ...` steers inside the block, then restores the previous controls."""
        previous = list(self._controls)
        self.set_control(vector, strength, **options)
        try:
            yield self
        finally:
            self._apply_controls(previous)

    @contextlib.contextmanager
    def unsteered(self):
        """Run the block without steering (training reads the plain model), then restore."""
        previous = list(self._controls)
        self._apply_controls([])
        try:
            yield self
        finally:
            self._apply_controls(previous)

    def _apply_controls(self, items: list) -> None:
        from ggsteer.interventions import compile_program
        from ggsteer.steer import Control, cvec_buffer

        if not items and not self._controls:
            return
        additive = [Control(i.vector, i.strength, i.layers) for i in items if i.is_plain_add]
        hooked = [i for i in items if not i.is_plain_add]
        buffer, first, last = cvec_buffer(additive, self.n_layer, self.n_embd)
        if first < 0:
            status = llama_cpp.llama_set_adapter_cvec(self._ctx.ctx, None, 0, self.n_embd, -1, -1)
        else:
            pointer = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = llama_cpp.llama_set_adapter_cvec(self._ctx.ctx, pointer, buffer.size, self.n_embd, first, last)
        if status != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed with status {status}")
        if hooked:
            compile_program([], hooked, n_slots=self.n_seq_max).install(self._hook)
        else:
            self._hook.clear_program()
        self._controls = list(items)
        # KV computed under other steering must not be reused as a cached prefix
        self.reset()
        if self.cache is not None:
            warnings.warn("the prompt cache was dropped: it held states computed under other steering", stacklevel=3)
            self.set_cache(None)

    # -- the hook's view of Llama's own decoding ------------------------------------------
    def generate(self, tokens, *args, **kwargs):
        """Llama.generate, telling the hook which evaluated tokens are prompt and which generated."""
        self._generating = False
        if self._hook.condition_states():
            # a condition averages the whole prompt: re-evaluating only past a reused prefix would
            # count the previous prompt's rows too
            self.reset()
        elif self._generated_from is not None and self.n_tokens > self._generated_from and self._phase_gated():
            # tokens generated before are prompt now: Llama may reuse only what was evaluated as prompt
            self.n_tokens = self._generated_from
        inner = super().generate(tokens, *args, **kwargs)
        try:
            for token in inner:
                self._generating = True
                yield token
        finally:
            self._generating = False
            inner.close()

    def eval(self, tokens) -> None:
        """Llama.eval; with hook interventions active, each decode's rows are described to the hook first."""
        self._track_generated_rows()
        if not self._hook.intervening:
            return super().eval(tokens)
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            n = len(chunk)
            positions = np.arange(self.n_tokens, self.n_tokens + n, dtype=np.int32)
            outputs = np.arange(n, dtype=np.int32) if self._logits_all else np.array([n - 1], np.int32)
            generated = np.full(n, self._generating, dtype=np.uint8)
            self._hook.set_rows(np.zeros(n, np.int32), positions, generated, outputs)
            try:
                super().eval(chunk)
            finally:
                self._hook.clear_rows()
            error = self._hook.take_error()
            if error:
                raise RuntimeError(f"ggsteer hook: {error}")

    def _track_generated_rows(self) -> None:
        """Remember where the cached rows evaluated as generated tokens begin."""
        if self._generated_from is not None and self._generated_from >= self.n_tokens:
            self._generated_from = None  # those rows are about to be overwritten
        if self._generating and self._generated_from is None:
            self._generated_from = self.n_tokens

    def _phase_gated(self) -> bool:
        return any(getattr(item, "when", "all") != "all" for item in self._controls)

    def decode_batch(self, batch, generated=False) -> None:
        """llama_decode on a filled llama_batch, describing its rows to the hook first.

        Rows are taken from the batch itself: slot = sequence id, position, outputs where logits
        are requested; `generated` (bool or per-row array) marks generated tokens.
        """
        n = batch.n_tokens
        positions = np.ctypeslib.as_array(batch.pos, shape=(n,)).astype(np.int32)
        slots = np.array([batch.seq_id[i][0] for i in range(n)], dtype=np.int32)
        outputs = np.flatnonzero(np.ctypeslib.as_array(batch.logits, shape=(n,))).astype(np.int32)
        flags = np.broadcast_to(np.asarray(generated, dtype=np.uint8), (n,))
        self._hook.set_rows(slots, positions, np.ascontiguousarray(flags), outputs)
        try:
            status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        finally:
            self._hook.clear_rows()
        error = self._hook.take_error()
        if status != 0 or error:
            detail = f": {error}" if error else " (status 1: the KV cache is full; raise n_ctx or use smaller batches)"
            raise RuntimeError(f"llama_decode failed with status {status}{detail}")

    def generate_batch(self, prompts, controls=None, max_tokens=64, **sampling):
        """Complete several prompts side by side, each with its own controls, in shared decodes.

        `controls[i]` steers prompt i: None, a ControlVector, a `(vector, strength)` pair, an
        `Intervention`, or a list of those. `max_tokens`, `temperature` (0 = greedy), `top_p`,
        `seed` and `stop` (a string or list of strings) apply to every sequence, or give a list
        with one value per prompt; a single int seed seeds sequence i with `seed + i`.
        `on_token(i, text)` is called with each new piece of text. Returns the texts, or with
        `details=True` a `BatchCompletion` per prompt (text, finish_reason "stop"/"length",
        prompt_tokens, completion_tokens).
        """
        from ggsteer.batch_generate import generate_batch

        return generate_batch(self, prompts, controls, max_tokens, **sampling)

    def chat_instruction_formatter(self):
        """A function wrapping one user instruction in the model's chat template, or None for base models."""
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos = self.detokenize([self.token_bos()], special=True).decode("utf-8", "replace")
        eos = self.detokenize([self.token_eos()], special=True).decode("utf-8", "replace")
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

        def format_instruction(text: str) -> str:
            prompt = formatter(messages=[{"role": "user", "content": text}]).prompt
            # tokenize_prompt adds BOS itself
            return prompt[len(bos):] if bos and prompt.startswith(bos) else prompt

        return format_instruction

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens of a prompt exactly as `create_completion` would decode them (BOS as the model wants)."""
        return self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def hidden_states(
        self,
        prompts: Sequence[str],
        layers: Sequence[int] | None = None,
        pool: str = "last",
        batch_size: int | None = None,
        *,
        share_prefixes: bool = True,
        progress: bool | None = None,
    ) -> np.ndarray | list[np.ndarray]:
        """Residual stream (output of block i, llama.cpp's `l_out-i`) for each prompt and layer.

        Returns float32 `[len(prompts), len(layers), n_embd]` for `pool="last"` (the final token)
        or `"mean"` (mean over the prompt's tokens), and for `pool="all"` a list of
        `[n_tokens, len(layers), n_embd]` arrays. `layers` defaults to every layer, in order.
        `batch_size` caps the sequences decoded together (default: the context's n_seq_max);
        with `share_prefixes`, text shared between prompts is decoded once.
        """
        from ggsteer.capture import capture_hidden_states

        return capture_hidden_states(
            self,
            prompts,
            layers=layers,
            pool=pool,
            batch_size=batch_size,
            share_prefixes=share_prefixes,
            progress=progress,
        )
