"""SteeredModel: a llama_cpp.Llama whose context carries ggsteer's native eval callback.

How the callback gets in (no patching of llama_cpp): `Llama.__init__` builds the model and a
context, then `runtime.hooked_context.install_hooked_context` replaces that context by one whose
eval callback is ggsteer's native hook (`self.hook`). Everything else (`__call__`,
`create_completion`, `create_chat_completion`, tokenizer, sampler) is Llama's own. SteeredModel
composes the layers below it: steering (controls -> adapter buffer + hook program), generation
(batches of sequences), train (capture) and chat_format.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np

from ggsteer import chat_format
from ggsteer.generation import generate_batch
from ggsteer.runtime.default_model import default_model_path
from ggsteer.runtime.hooked_context import (
    HookError,
    install_hooked_context,
    is_end_of_generation,
    max_parallel_sequences,
    model_dimensions,
    new_hook,
)
from ggsteer.runtime.logs import install_log_filter
from ggsteer.runtime.rpc import ModelParamsWithDevices, WorkerPlacement, worker_llama_kwargs
from ggsteer.steering.adapter import cvec_buffer
from ggsteer.steering.interventions import Intervention, make_intervention, normalize_controls
from ggsteer.steering.program import compile_program
from ggsteer.train.capture import capture_hidden_states

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


class EmbeddingWidth(int):
    """`model.n_embd` is an int (ggsteer's API) that can still be called like `Llama.n_embd()`,
    which it shadows: Llama.embed and create_embedding call it."""

    def __call__(self) -> int:
        return int(self)


class SteeredModel(llama_cpp.Llama):
    """A `llama_cpp.Llama` that ggsteer can read and steer.

    `model_path=None` opens the embedded default model (Gemma 3 270M Q4_K_M). Other keyword
    arguments pass through to `Llama` (`n_gpu_layers`, `n_threads`, `n_ctx`, `verbose`, ...).
    `n_seq_max` bounds how many prompts run side by side in one decode. llama.cpp's log lines are
    shown with `verbose=True` (errors always); `model.context` is ggsteer's handle on the context.
    `rpc_servers=["host:port", ...]` places the layers on llama.cpp RPC workers (`ggsteer rpc-server`):
    every layer unless `n_gpu_layers` says otherwise, split by `tensor_split` (default: by the
    workers' free memory).
    """

    model_params = ModelParamsWithDevices()

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_batch: int = DEFAULT_N_BATCH,
        n_seq_max: int = DEFAULT_N_SEQ_MAX,
        verbose: bool = False,
        rpc_servers: str | Sequence[str] | None = None,
        **llama_kwargs,
    ):
        path = check_model_path(default_model_path() if model_path is None else model_path)
        if not 1 <= n_seq_max <= max_parallel_sequences():
            raise ValueError(f"n_seq_max={n_seq_max} must be between 1 and {max_parallel_sequences()}")
        # llama.cpp's log lines (model loading, cache setup) stay quiet unless verbose
        install_log_filter()
        self._worker_placement = None if rpc_servers is None else WorkerPlacement(rpc_servers)
        if self._worker_placement is not None:
            llama_kwargs = worker_llama_kwargs(llama_kwargs)
        # one ubatch per decode keeps the callback's batch rows equal to ours
        llama_kwargs["n_ubatch"] = n_batch
        super().__init__(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, verbose=verbose, **llama_kwargs)
        self.n_layer, n_embd = model_dimensions(self)
        self.n_embd = EmbeddingWidth(n_embd)
        self.hook = new_hook(self.n_layer, self.n_embd)
        self._controls: list = []
        self._generating = False
        self._generated_from: int | None = None  # first cached position evaluated as a generated token
        self.context = install_hooked_context(self, self.hook, n_seq_max, self.model_hint)

    def close(self) -> None:
        # __init__ may fail on a bad path before Llama has built anything to close
        if hasattr(self, "_stack"):
            super().close()

    @property
    def closed(self) -> bool:
        """True once close() has freed the llama.cpp context (or __init__ failed before making one)."""
        return getattr(self, "ctx", None) is None

    @property
    def n_seq_max(self) -> int:
        return self.context.n_seq_max()

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
        op: str | None = None,
        when: str | None = None,
        first_k: int | None = None,
        condition=None,
        skip_first: int | None = None,
    ) -> None:
        """Steer every following generation.

        `vector` is a ControlVector (with `strength`, default its recommended strength or 1.0) or a
        list of `(vector, strength)` pairs, summed. Strength 1.0 is the trained mean gap between
        positive and negative activations at each layer; `raw=True` makes it a plain coefficient.
        `layers` defaults to the vector's recommended layers. `op` is "add", "ablate", "clamp" or
        "add_normalized"; `when` is "all", "prompt" or "generated"; left unset, op, when, layers and
        strength come from the vector's tuned settings (`ggsteer tune`) when it has them, else "add", "all";
        `first_k` limits steering to the first k positions; `condition=(vector, threshold, layer)` steers
        only prompts whose mean state at `layer` has at least that cosine with the condition vector;
        `skip_first=k` leaves positions < k alone (ablate and clamp leave the attention sink, position 0,
        alone by default). Plain addition on every token goes through llama.cpp's adapter (no cost); the
        rest runs in ggsteer's native hook.
        """
        if isinstance(vector, (list, tuple)) and not all(isinstance(pair, (list, tuple)) and len(pair) == 2
                                                         for pair in vector):
            raise TypeError("set_control takes a ControlVector or a list of (ControlVector, strength) pairs")
        control = vector if isinstance(vector, (list, tuple)) else [(vector, strength)]
        self._apply_controls(normalize_controls(self, control, op=op, layers=layers, raw=raw, when=when,
                                                first_k=first_k, condition=condition, skip_first=skip_first))

    def intervention(self, vector, strength: float = 1.0, **options):
        """One Intervention for this model (see set_control for the options), to combine with others."""
        return make_intervention(vector, strength, self.n_layer, self.n_embd, **options)

    def set_interventions(self, items) -> None:
        """Steer with several Interventions at once (e.g. add one vector while ablating another)."""
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
        if not items and not self._controls:
            return
        additive = [i for i in items if i.is_plain_add]
        hooked = [i for i in items if not i.is_plain_add]
        buffer, first, last = cvec_buffer(additive, self.n_layer, self.n_embd)
        self.context.set_adapter_cvec(None if first < 0 else buffer, self.n_embd, first, last)
        if hooked:
            compile_program([], hooked, n_slots=self.n_seq_max).install(self.hook)
        else:
            self.hook.clear_program()
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
        if self.hook.condition_states():
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
        if not self.hook.intervening:
            return super().eval(tokens)
        if len(tokens) > self.n_batch and any(item.condition is not None for item in self._controls):
            # a condition decides on the whole prompt's mean: a prompt split over decodes would be
            # steered from a partial mean first
            raise ValueError(f"a prompt under a condition is decoded in one go: its {len(tokens)} tokens must fit "
                             f"n_batch={self.n_batch} (raise n_batch)")
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start : start + self.n_batch])
            n = len(chunk)
            positions = np.arange(self.n_tokens, self.n_tokens + n, dtype=np.int32)
            outputs = np.arange(n, dtype=np.int32) if self._logits_all else np.array([n - 1], np.int32)
            generated = np.full(n, self._generating, dtype=np.uint8)
            self.hook.set_rows(np.zeros(n, np.int32), positions, generated, outputs)
            before = self.n_tokens
            try:
                super().eval(chunk)
            finally:
                self.hook.clear_rows()
            error = self.hook.take_error()
            if error:
                self._forget_tokens_from(before)
                raise HookError(f"ggsteer hook ({self.model_hint} architecture): {error}")

    def _forget_tokens_from(self, position: int) -> None:
        """Drop cached states from `position` on (computed without the interventions they needed),
        so no later call reuses them as a prefix."""
        self.context.seq_rm(0, position, -1)
        self.n_tokens = position

    def embed(self, *args, **kwargs):
        """Llama.embed; its decodes do not describe their rows to the hook, so an error they
        record (hook interventions set) is raised here, not by the next call."""
        self.hook.take_error()  # left by an earlier undescribed decode: not this call's
        result = super().embed(*args, **kwargs)
        error = self.hook.take_error()
        if error:
            raise HookError(f"ggsteer hook ({self.model_hint} architecture): {error}")
        return result

    def _track_generated_rows(self) -> None:
        """Remember where the cached rows evaluated as generated tokens begin."""
        if self._generated_from is not None and self._generated_from >= self.n_tokens:
            self._generated_from = None  # those rows are about to be overwritten
        if self._generating and self._generated_from is None:
            self._generated_from = self.n_tokens

    def _phase_gated(self) -> bool:
        return any(getattr(item, "when", "all") != "all" for item in self._controls)

    def decode_batch(self, batch, generated=False) -> None:
        """llama_decode on a filled llama_batch, describing its rows to the hook first
        (slot = sequence id; `generated`, a bool or per-row array, marks generated tokens)."""
        self.context.decode(batch, generated)

    def is_end_of_generation(self, token: int) -> bool:
        return is_end_of_generation(self, token)

    def generate_batch(self, prompts, controls=None, max_tokens=64, **sampling):
        """Complete several prompts side by side, each with its own controls, in shared decodes.

        `controls[i]` steers prompt i: None, a ControlVector, a `(vector, strength)` pair, an
        `Intervention`, or a list of those. `max_tokens`, `temperature` (0 = greedy, the default),
        `top_k`, `top_p`, `min_p`, `repeat_penalty`, `repeat_last_n`, `presence_penalty`,
        `frequency_penalty`, `seed` and `stop` (a string or list of strings) apply to every sequence,
        or give a list with one value per prompt; a single int seed seeds sequence i with `seed + i`.
        Tokens come from llama.cpp's sampler chain; unset settings are `ggsteer.sampling.DEFAULTS`.
        `on_token(i, text)` is called with each new piece of text. Returns the texts, or with
        `details=True` a `BatchCompletion` per prompt (text, finish_reason "stop"/"length",
        prompt_tokens, completion_tokens).
        """
        return generate_batch(self, prompts, controls, max_tokens, **sampling)

    def chat_instruction_formatter(self):
        """A function wrapping one user instruction in the model's chat template, or None for base models."""
        return chat_format.instruction_formatter(self)

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """Tokens of a prompt exactly as `create_completion` would decode them (BOS as the model wants)."""
        return self.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def hidden_states(self, prompts: Sequence[str], layers: Sequence[int] | None = None, pool: str | int = "last",
                      batch_size: int | None = None, *, share_prefixes: bool = True,
                      progress: bool | None = None, stats=None) -> np.ndarray | list[np.ndarray]:
        """Residual stream (output of block i, llama.cpp's `l_out-i`) for each prompt and layer.

        Returns float32 `[len(prompts), len(layers), n_embd]` for `pool="last"` (the final token)
        or `"mean"` (mean over the prompt's tokens) or a count k (mean over its last k), and for `pool="all"` a list of
        `[n_tokens, len(layers), n_embd]` arrays. `layers` defaults to every layer, in order.
        `batch_size` caps the sequences decoded together (default: the context's n_seq_max);
        with `share_prefixes`, text shared between prompts is decoded once. The graph ends at the
        deepest layer asked for (no output head runs; the last layer's rows are outputs). Pass a
        `ggsteer.CaptureStats()` as `stats` to count decodes, tokens and output rows.
        """
        return capture_hidden_states(self, prompts, layers=layers, pool=pool, batch_size=batch_size,
                                     share_prefixes=share_prefixes, progress=progress, stats=stats)
