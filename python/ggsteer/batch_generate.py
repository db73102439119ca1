"""Several sequences, each with its own interventions, decoded side by side in shared batches.

Every sequence gets a KV sequence id and a slot in the hook's program; before each decode the hook
learns which batch row belongs to which slot, its position and whether it is a generated token.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import llama_cpp
import numpy as np

from ggsteer.interventions import Intervention, compile_program, make_intervention
from ggsteer.llama_batch import OwnedBatch

if TYPE_CHECKING:
    from ggsteer.model import SteeredModel


@dataclass(frozen=True)
class SequenceSampling:
    """How one sequence of a batch is sampled and when it ends."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchCompletion:
    """One sequence's result: its text, why it ended ("stop": end of generation or a stop string;
    "length": max_tokens reached) and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class SequenceState:
    index: int
    prompt: list[int]
    sampling: SequenceSampling
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # set when the sequence ends
    next_logits: np.ndarray | None = None  # copied out right after the decode that produced them

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> BatchCompletion:
        return BatchCompletion(self.text, self.finish_reason or "length", len(self.prompt), len(self.generated))


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


def per_sequence(name: str, value, n: int) -> list:
    """A setting given once for every sequence, or as a list with one entry per sequence."""
    if isinstance(value, (list, tuple)) and not (name == "stop" and all(isinstance(v, str) for v in value)):
        if len(value) != n:
            raise ValueError(f"{n} prompts but {len(value)} values of {name}")
        return list(value)
    return [value] * n


def sequence_samplings(n: int, max_tokens, temperature, top_p, seed, stop) -> list[SequenceSampling]:
    """Per-sequence settings; a single integer seed gives sequence i the seed `seed + i`."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = [int(seed) + i for i in range(n)]
    if isinstance(stop, str):
        stop = [stop]
    columns = [per_sequence(name, value, n) for name, value in
               (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed), ("stop", stop))]
    samplings = []
    for i, (count, temp, p, s, words) in enumerate(zip(*columns)):
        if int(count) < 1:
            raise ValueError(f"max_tokens must be at least 1, got {count} (sequence {i})")
        if not 0.0 < float(p) <= 1.0 or float(temp) < 0.0:
            raise ValueError(f"sequence {i}: temperature must be >= 0 and top_p in (0, 1], got {temp} and {p}")
        words = (words,) if isinstance(words, str) else tuple(words or ())
        samplings.append(SequenceSampling(int(count), float(temp), float(p), s, words))
    return samplings


def generate_batch(
    model: "SteeredModel",
    prompts: Sequence[str],
    controls=None,
    max_tokens: int | Sequence[int] = 64,
    *,
    temperature: float | Sequence[float] = 0.0,
    top_p: float | Sequence[float] = 1.0,
    seed: int | Sequence[int | None] | None = None,
    stop: Sequence[str] | Sequence[Sequence[str]] | None = None,
    on_token: Callable[[int, str], None] | None = None,
    details: bool = False,
) -> list[str] | list[BatchCompletion]:
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    controls = [None] * len(prompts) if controls is None else list(controls)
    if len(controls) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(controls)} controls")
    if len(prompts) > model.n_seq_max:
        raise ValueError(f"{len(prompts)} prompts but the context runs at most n_seq_max={model.n_seq_max} sequences")
    samplings = sequence_samplings(len(prompts), max_tokens, temperature, top_p, seed, stop)
    per_slot = [normalize_controls(model, c) for c in controls]
    states = [
        SequenceState(i, model.tokenize_prompt(p), sampling, np.random.default_rng(sampling.seed))
        for i, (p, sampling) in enumerate(zip(prompts, samplings))
    ]
    needed = sum(len(s.prompt) + s.sampling.max_tokens for s in states)
    if needed > model.n_ctx():
        raise ValueError(f"prompts plus max_tokens need {needed} KV cells, more than n_ctx={model.n_ctx()} (shared by all sequences)")
    with model.unsteered():
        compile_program(per_slot).install(model._hook)
        runner = BatchRunner(model, states)
        llama_cpp.llama_memory_clear(runner.memory, True)
        try:
            runner.decode_prompts()
            _generate_loop(model, runner, states, on_token)
        finally:
            runner.close()
            model._hook.clear_program()
            llama_cpp.llama_memory_clear(runner.memory, True)
            model.reset()
    return [s.result() for s in states] if details else [s.text for s in states]


def _generate_loop(model, runner, states, on_token) -> None:
    while True:
        rows = []
        for state in states:
            if state.done:
                continue
            sampling = state.sampling
            token = sample_token(state.next_logits, sampling.temperature, sampling.top_p, state.rng)
            if llama_cpp.llama_token_is_eog(model._model.vocab, token):
                state.finish_reason = "stop"
                continue
            state.generated.append(token)
            _update_text(model, state, on_token)
            if not state.done and len(state.generated) >= sampling.max_tokens:
                state.finish_reason = "length"
            if not state.done:
                rows.append((state, token, len(state.prompt) + len(state.generated) - 1, True, True))
        if not rows:
            return
        runner.decode(rows)


def _update_text(model, state: SequenceState, on_token) -> None:
    text = model.detokenize(state.generated).decode("utf-8", errors="ignore")
    for word in state.sampling.stop:
        cut = text.find(word)
        if cut >= 0:
            text = text[:cut]
            state.finish_reason = "stop"
    if on_token is not None and len(text) > len(state.text):
        on_token(state.index, text[len(state.text) :])
    state.text = text
