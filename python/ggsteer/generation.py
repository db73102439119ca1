"""Several sequences, each with its own interventions and sampling, decoded side by side.

Every sequence gets a KV sequence id, which is also its slot in the hook's program; before each
decode the hook learns which batch row belongs to which slot, its position and whether it is a
generated token. A `ContinuousBatch` lets sequences join and leave between decodes (the server
keeps one open); `generate_batch` runs a fixed set of prompts through one to the end.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, field
from typing import Callable, Sequence

import llama_cpp
import numpy as np

from ggsteer.runtime.batch import OwnedBatch
from ggsteer.runtime.grammar import GrammarConstraint
from ggsteer.runtime.protocol import HookedModel
from ggsteer.steering.interventions import Intervention, normalize_controls
from ggsteer.steering.program import compile_program


@dataclass(frozen=True)
class SequenceSampling:
    """How one sequence of a batch is sampled and when it ends."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's penalties over the tokens generated so far: logit -= frequency * count + presence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    grammar: str | None = None  # GBNF the generated text must follow (llama.cpp's grammar sampler)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of the raw logits, before
    penalties, bias and temperature) and the `top` most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class BatchCompletion:
    """One sequence's result: its text, why it ended ("stop": end of generation or a stop string;
    "length": max_tokens reached) and its token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tokens: tuple[int, ...] = ()  # the generated tokens (an end-of-generation token is not one)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token, when sampling.logprobs is set


@dataclass(eq=False)
class SequenceState:
    index: int  # the caller's number for this sequence (generate_batch: the prompt's index)
    slot: int  # KV sequence id and hook slot
    prompt: list[int]
    sampling: SequenceSampling
    controls: list[Intervention]
    rng: np.random.Generator
    on_piece: Callable[[str], None] | None = None
    constraint: GrammarConstraint | None = None
    n_decoded: int = 0  # prompt tokens decoded so far (long prompts take several decodes)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # set when the sequence ends
    next_logits: np.ndarray | None = None  # copied out right after the decode that produced them
    ready_since: int = 0  # the decode that produced next_logits: the longest-waiting go first

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv_cells(self) -> int:
        return len(self.prompt) + self.sampling.max_tokens

    def result(self) -> BatchCompletion:
        logprobs = tuple(self.logprobs) if self.sampling.logprobs is not None else None
        return BatchCompletion(self.text, self.finish_reason or "length", len(self.prompt), len(self.generated),
                               tuple(self.generated), logprobs)


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


def adjusted_logits(logits: np.ndarray, sampling: SequenceSampling, generated: Sequence[int]) -> np.ndarray:
    """The logits after OpenAI's presence/frequency penalties (over `generated`) and logit_bias."""
    penalize = bool(generated) and (sampling.presence_penalty or sampling.frequency_penalty)
    if not penalize and not sampling.logit_bias:
        return logits
    adjusted = logits.astype(np.float64)
    if penalize:
        tokens, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        adjusted[tokens] -= sampling.frequency_penalty * counts + sampling.presence_penalty
    for token, bias in sampling.logit_bias:
        adjusted[token] += bias
    return adjusted


def token_logprob(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` and the `n_top` most likely tokens (ties: lower id first)."""
    scaled = logits.astype(np.float64)
    log_probs = scaled - scaled.max()
    log_probs -= np.log(np.exp(log_probs).sum())
    top = np.argsort(-log_probs, kind="stable")[:n_top]
    return TokenLogprob(int(token), float(log_probs[token]), tuple((int(t), float(log_probs[t])) for t in top))


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


class ContinuousBatch:
    """Sequences that join and leave between decodes, each with its own controls and sampling.

    `add` reserves a slot and the KV cells a sequence can use (prompt + max_tokens; all sequences
    share n_ctx); `step` samples the next token of every sequence whose logits are ready and
    decodes those tokens together with as much waiting prompt as fits in n_batch; finished
    sequences leave the batch and free their slot and cells. The model is unsteered while the
    batch is open: only the per-slot program steers.

    `one_sequence_per_decode`: every llama_decode holds one sequence's rows, decoded as if it ran
    alone (see benchmarks/deterministic.py for what that buys on CPU and what it costs).
    """

    def __init__(self, model: HookedModel, max_sequences: int | None = None, *, one_sequence_per_decode: bool = False):
        self.model = model
        self.one_sequence_per_decode = one_sequence_per_decode
        self.max_sequences = min(max_sequences or model.n_seq_max, model.n_seq_max)
        self.slots: list[SequenceState | None] = [None] * model.n_seq_max
        self.reserved_cells = 0
        self._program_stale = True
        self.n_decodes = 0
        self._cleanup = contextlib.ExitStack()
        self._cleanup.enter_context(model.unsteered())
        self.batch = OwnedBatch(model.n_batch)
        self._cleanup.callback(self._release)
        self.memory = llama_cpp.llama_get_memory(model.ctx)
        llama_cpp.llama_memory_clear(self.memory, True)

    def __enter__(self) -> "ContinuousBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._cleanup.close()

    def _release(self) -> None:
        self.batch.close()
        self.model.hook.clear_program()
        llama_cpp.llama_memory_clear(self.memory, True)
        self.model.reset()

    @property
    def active(self) -> list[SequenceState]:
        return [s for s in self.slots if s is not None]

    def fits(self, n_prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a sequence of this size can join now."""
        return (len(self.active) < self.max_sequences
                and self.reserved_cells + n_prompt_tokens + max_tokens <= self.model.n_ctx())

    def add(self, tokens: list[int], controls: list[Intervention], sampling: SequenceSampling, *,
            index: int = 0, on_piece: Callable[[str], None] | None = None) -> SequenceState:
        if not tokens:
            raise ValueError("a sequence needs at least one prompt token")
        if not self.fits(len(tokens), sampling.max_tokens):
            raise ValueError(f"no room for a sequence of {len(tokens)} + {sampling.max_tokens} tokens: "
                             f"{len(self.active)} sequences hold {self.reserved_cells} of n_ctx={self.model.n_ctx()} cells")
        constraint = None if sampling.grammar is None else GrammarConstraint(self.model, sampling.grammar)
        slot = self.slots.index(None)
        state = SequenceState(index, slot, list(tokens), sampling, list(controls),
                              np.random.default_rng(sampling.seed), on_piece, constraint)
        self.slots[slot] = state
        self.reserved_cells += state.kv_cells
        self._program_stale = True
        return state

    def remove(self, state: SequenceState) -> None:
        """Drop a sequence (finished or abandoned) and free its KV cells and slot."""
        if self.slots[state.slot] is not state:
            return
        llama_cpp.llama_memory_seq_rm(self.memory, state.slot, -1, -1)
        self.slots[state.slot] = None
        self.reserved_cells -= state.kv_cells
        self._program_stale = True

    def step(self) -> list[SequenceState]:
        """One decode; returns the sequences that finished (already removed from the batch).

        A decode holds at most n_batch rows: when more sequences have a token ready, those that
        have waited longest are sampled now and the rest keep their logits for the next decode.
        """
        rows, finished = [], []
        ready = sorted((s for s in self.active if s.next_logits is not None), key=lambda s: (s.ready_since, s.slot))
        for state in ready:
            if len(rows) == self.batch.capacity:
                break
            token = self._next_token(state)
            if state.done:
                finished.append(state)
            else:
                rows.append((state, token, len(state.prompt) + len(state.generated) - 1, True, True))
        for state in finished:
            self.remove(state)
        if self.one_sequence_per_decode:
            for row in rows:
                self._decode([row])
            for state in self.active:
                if prompt := self._prompt_rows(self.batch.capacity, [state]):
                    self._decode(prompt)
            return finished
        rows += self._prompt_rows(self.batch.capacity - len(rows))
        if rows:
            self._decode(rows)
        return finished

    def _next_token(self, state: SequenceState) -> int:
        sampling = state.sampling
        logits = adjusted_logits(state.next_logits, sampling, state.generated)
        if state.constraint is not None:
            logits = state.constraint.allowed(logits)
            if logits is None:  # a dead end of the grammar ends this sequence, not its neighbours
                state.next_logits, state.finish_reason = None, "stop"
                return 0
        token = sample_token(logits, sampling.temperature, sampling.top_p, state.rng)
        raw_logits, state.next_logits = state.next_logits, None
        if self.model.is_end_of_generation(token):
            state.finish_reason = "stop"
            return token
        if state.constraint is not None:
            state.constraint.accept(token)
        if sampling.logprobs is not None:
            state.logprobs.append(token_logprob(raw_logits, token, sampling.logprobs))
        state.generated.append(token)
        self._update_text(state)
        if not state.done and len(state.generated) >= sampling.max_tokens:
            state.finish_reason = "length"
        return token

    def _update_text(self, state: SequenceState) -> None:
        text = self.model.detokenize(state.generated).decode("utf-8", errors="ignore")
        for word in state.sampling.stop:
            cut = text.find(word)
            if cut >= 0:
                text = text[:cut]
                state.finish_reason = "stop"
        if state.on_piece is not None and len(text) > len(state.text):
            state.on_piece(text[len(state.text) :])
        state.text = text

    def _prompt_rows(self, budget: int, states: list[SequenceState] | None = None) -> list:
        """Prompt tokens still to decode, oldest sequence first, up to `budget` rows."""
        rows = []
        for state in self.active if states is None else states:
            while budget > 0 and state.n_decoded < len(state.prompt):
                pos = state.n_decoded
                rows.append((state, state.prompt[pos], pos, False, pos == len(state.prompt) - 1))
                state.n_decoded += 1
                budget -= 1
        return rows

    def _decode(self, rows: list[tuple[SequenceState, int, int, bool, bool]]) -> None:
        """rows: (state, token, position, is_generated, wants_logits)."""
        if self._program_stale:
            compile_program([s.controls if s else [] for s in self.slots], n_slots=len(self.slots)).install(self.model.hook)
            self._program_stale = False
        batch = self.batch
        batch.clear()
        outputs = []
        for state, token, pos, _, wants in rows:
            row = batch.add(token, pos, state.slot, wants)
            if wants:
                outputs.append((state, row))
        self.model.decode_batch(batch.batch, generated=np.array([row[3] for row in rows], np.uint8))
        self.n_decodes += 1
        # a later decode overwrites llama.cpp's logits: keep each sequence's own
        for state, row in outputs:
            pointer = llama_cpp.llama_get_logits_ith(self.model.ctx, row)
            state.next_logits = np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab(),)).copy()
            state.ready_since = self.n_decodes


def generate_batch(
    model: HookedModel,
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
    token_lists = [model.tokenize_prompt(p) for p in prompts]
    needed = sum(len(tokens) + sampling.max_tokens for tokens, sampling in zip(token_lists, samplings))
    if needed > model.n_ctx():
        raise ValueError(f"prompts plus max_tokens need {needed} KV cells, more than n_ctx={model.n_ctx()} (shared by all sequences)")
    with ContinuousBatch(model) as batch:
        states = [
            batch.add(tokens, items, sampling, index=i,
                      on_piece=None if on_token is None else (lambda piece, i=i: on_token(i, piece)))
            for i, (tokens, items, sampling) in enumerate(zip(token_lists, per_slot, samplings))
        ]
        while batch.active:
            batch.step()
    return [s.result() for s in states] if details else [s.text for s in states]
