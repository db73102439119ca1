"""What the layers above runtime/ need from a model: a Protocol, so they never import SteeredModel.

`ggsteer.SteeredModel` implements it; train/, generation.py and evaluate/ are written against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from llama_cpp import llama_batch

from ggsteer.runtime.context import Context


class HookedModel(Protocol):
    n_layer: int
    n_embd: int
    n_batch: int
    hook: Any  # the native hook (ggsteer._native.Hook) installed as this model's eval callback
    context: Context  # decodes, KV cache, logits: the only way above runtime/ into llama.cpp

    @property
    def n_seq_max(self) -> int: ...

    @property
    def model_hint(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    def n_ctx(self) -> int: ...

    def n_vocab(self) -> int: ...

    def tokenize_prompt(self, prompt: str) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes: ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def token_bos(self) -> int: ...

    def decode_batch(self, batch: llama_batch, generated: Any = False) -> None: ...

    def reset(self) -> None: ...

    def unsteered(self) -> AbstractContextManager[Any]: ...
