"""Several sequences, each with its own interventions, decoded side by side in shared batches.

Every sequence gets a KV sequence id and a slot in the hook's program; before each decode the hook
learns which batch row belongs to which slot, its position and whether it is a generated token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import llama_cpp
import numpy as np

from ggsteer.interventions import Intervention, compile_program, make_intervention
from ggsteer.llama_batch import OwnedBatch

if TYPE_CHECKING:
    from ggsteer.model import SteeredModel


@dataclass
class SequenceState:
    index: int
    prompt: list[int]
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    next_logits: np.ndarray | None = None  # copied out right after the decode that produced them


def normalize_controls(model: "SteeredModel", control) -> list[Intervention]:
    """None, a vector, (vector, strength), an Intervention or a list of those -> [Intervention]."""
    from ggsteer.vector import ControlVector

    if control is None:
        return []
    if isinstance(control, (Intervention, ControlVector)) or _is_pair(control):
        control = [control]
    items = []
    for item in control:
        if isinstance(item, Intervention):
            items.append(item)
        elif isinstance(item, ControlVector):
            items.append(make_intervention(item, item.recommended_strength or 1.0, model.n_layer, model.n_embd))
        elif _is_pair(item):
            items.append(make_intervention(item[0], item[1], model.n_layer, model.n_embd))
        else:
            raise TypeError(f"cannot steer with {type(item).__name__}: give a ControlVector, (vector, strength) or Intervention")
    return items


def _is_pair(item) -> bool:
    from ggsteer.vector import ControlVector

    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], ControlVector)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


class BatchRunner:
    def __init__(self, model: "SteeredModel", states: list[SequenceState]):
        self.model = model
        self.states = states
        self.batch = OwnedBatch(model.n_batch)
        self.memory = llama_cpp.llama_get_memory(model.ctx)

    def close(self) -> None:
        self.batch.close()

    def decode(self, rows: list[tuple[SequenceState, int, int, bool, bool]]) -> None:
        """rows: (state, token, position, is_generated, wants_logits)."""
        batch = self.batch
        batch.clear()
        outputs = []
        for state, token, pos, _, wants in rows:
            # the sequence id is also the sequence's slot in the hook's program
            row = batch.add(token, pos, state.index, wants)
            if wants:
                outputs.append(row)
        self.model.decode_batch(batch.batch, generated=np.array([row[3] for row in rows], np.uint8))
        # a later decode overwrites llama.cpp's logits: keep each sequence's own
        for r in outputs:
            rows[r][0].next_logits = self.logits_at(r)

    def decode_prompts(self) -> None:
        pending = [(s, t, p) for s in self.states for p, t in enumerate(s.prompt)]
        n_batch = self.model.n_batch
        for start in range(0, len(pending), n_batch):
            chunk = pending[start : start + n_batch]
            self.decode([(s, t, p, False, p == len(s.prompt) - 1) for s, t, p in chunk])

    def logits_at(self, row: int) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.model.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab(),)).copy()


def generate_batch(
    model: "SteeredModel",
    prompts: Sequence[str],
    controls=None,
    max_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    on_token: Callable[[int, str], None] | None = None,
) -> list[str]:
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    controls = [None] * len(prompts) if controls is None else list(controls)
    if len(controls) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(controls)} controls")
    if len(prompts) > model.n_seq_max:
        raise ValueError(f"{len(prompts)} prompts but the context runs at most n_seq_max={model.n_seq_max} sequences")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    per_slot = [normalize_controls(model, c) for c in controls]
    states = [
        SequenceState(i, model.tokenize_prompt(p), np.random.default_rng(None if seed is None else seed + i))
        for i, p in enumerate(prompts)
    ]
    needed = sum(len(s.prompt) + max_tokens for s in states)
    if needed > model.n_ctx():
        raise ValueError(f"prompts plus max_tokens need {needed} KV cells, more than n_ctx={model.n_ctx()} (shared by all sequences)")
    with model.unsteered():
        compile_program(per_slot).install(model._hook)
        runner = BatchRunner(model, states)
        llama_cpp.llama_memory_clear(runner.memory, True)
        try:
            runner.decode_prompts()
            _generate_loop(model, runner, states, max_tokens, temperature, top_p, list(stop or []), on_token)
        finally:
            runner.close()
            model._hook.clear_program()
            llama_cpp.llama_memory_clear(runner.memory, True)
            model.reset()
    return [s.text for s in states]


def _generate_loop(model, runner, states, max_tokens, temperature, top_p, stop, on_token) -> None:
    while True:
        rows = []
        for state in states:
            if state.done:
                continue
            token = sample_token(state.next_logits, temperature, top_p, state.rng)
            if llama_cpp.llama_token_is_eog(model._model.vocab, token):
                state.done = True
                continue
            state.generated.append(token)
            _update_text(model, state, stop, on_token)
            if len(state.generated) >= max_tokens:
                state.done = True
            if not state.done:
                rows.append((state, token, len(state.prompt) + len(state.generated) - 1, True, True))
        if not rows:
            return
        runner.decode(rows)


def _update_text(model, state: SequenceState, stop: list[str], on_token) -> None:
    text = model.detokenize(state.generated).decode("utf-8", errors="ignore")
    for word in stop:
        cut = text.find(word)
        if cut >= 0:
            text = text[:cut]
            state.done = True
    if on_token is not None and len(text) > len(state.text):
        on_token(state.index, text[len(state.text) :])
    state.text = text
