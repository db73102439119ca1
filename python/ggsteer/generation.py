"""Several sequences, each with its own interventions and sampling, decoded side by side.

Every sequence gets a KV sequence id, which is also its slot in the hook's program; before each
decode the hook learns which batch row belongs to which slot, its position and whether it is a
generated token. A `ContinuousBatch` lets sequences join and leave between decodes (the server
keeps one open); `generate_batch` runs a fixed set of prompts through one to the end. Each
sequence draws its tokens through its own llama.cpp sampler chain (runtime/sampler.py). This is the
one engine behind ggsteer's commands and server (docs/generation.md).
"""

from __future__ import annotations

import codecs
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ggsteer.runtime.batch import OwnedBatch
from ggsteer.runtime.protocol import HookedModel
from ggsteer.runtime.sampler import TokenSampler
from ggsteer.sampling import DEFAULTS, SequenceSampling, TokenLogprob, sequence_samplings, token_logprob
from ggsteer.steering.interventions import Intervention, normalize_controls
from ggsteer.steering.program import compile_program


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
    sampler: TokenSampler | None = None  # llama.cpp's sampler chain for this sequence
    on_piece: Callable[[str], None] | None = None
    n_decoded: int = 0  # prompt tokens decoded so far (long prompts take several decodes)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    decoded: str = ""  # the whole generation so far (text is cut at a stop string)
    n_bytes: int = 0  # bytes of the generation fed to the decoder
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("ignore"))
    finish_reason: str | None = None  # set when the sequence ends
    next_logits: np.ndarray | None = None  # copied out right after the decode that produced them
    ready_since: int = 0  # the decode that produced next_logits: the longest-waiting go first
    joined: int = 0  # admission order: prompts are decoded oldest first
    error: str | None = None  # why this sequence alone failed (its steering, sampling or logits); set when it ends

    @property
    def conditioned(self) -> bool:
        """A CAST condition decides on the mean of the whole prompt, so the prompt is decoded in one go."""
        return any(item.condition is not None for item in self.controls)

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


@contextlib.contextmanager
def per_slot_steering(model: HookedModel, seqs_per_row: int = 1):
    """Yields a batch of n_batch rows for decodes steered only by per-slot hook programs: inside,
    the model is unsteered (adapter and global program off) and starts from an empty cache; on
    exit the batch is freed, the program cleared, the cache emptied, the controls restored."""
    with model.unsteered(), OwnedBatch(model.n_batch, seqs_per_row) as batch:
        model.context.clear_memory()
        try:
            yield batch
        finally:
            model.hook.clear_program()
            model.context.clear_memory()
            model.reset()


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
        self._joined = 0
        self._cleanup = contextlib.ExitStack()
        self.batch = self._cleanup.enter_context(per_slot_steering(model))

    def __enter__(self) -> "ContinuousBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for state in self.active:
            if state.sampler is not None:
                state.sampler.close()
        self._cleanup.close()

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
        if any(item.condition is not None for item in controls) and len(tokens) > self.batch.capacity:
            raise ValueError(f"a prompt under a condition is decoded in one go: its {len(tokens)} tokens must fit "
                             f"n_batch={self.batch.capacity} (raise n_batch)")
        if not self.fits(len(tokens), sampling.max_tokens):
            raise ValueError(f"no room for a sequence of {len(tokens)} + {sampling.max_tokens} tokens: "
                             f"{len(self.active)} sequences hold {self.reserved_cells} "
                             f"of n_ctx={self.model.n_ctx()} cells")
        compile_program([controls], n_slots=1)  # steering the hook cannot take fails this sequence, not a decode
        sampler = sampling.new_sampler(self.model, tokens)
        slot = self.slots.index(None)
        state = SequenceState(index, slot, list(tokens), sampling, list(controls), sampler, on_piece)
        state.joined = self._joined = self._joined + 1
        self.slots[slot] = state
        self.reserved_cells += state.kv_cells
        self._program_stale = True
        return state

    def remove(self, state: SequenceState) -> None:
        """Drop a sequence (finished or abandoned) and free its KV cells and slot."""
        if self.slots[state.slot] is not state:
            return
        self.model.context.seq_rm(state.slot)
        if state.sampler is not None:
            state.sampler.close()
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
        # rows kept free so the oldest conditioned prompt waiting to start fits whole in this decode
        waiting = next((s for s in self._by_age() if s.conditioned and s.n_decoded == 0), None)
        limit = self.batch.capacity - (len(waiting.prompt) if waiting else 0)
        for state in ready:
            if len(rows) >= limit:
                break
            try:  # one sequence's sampling error (or NaN/Inf logits) ends that sequence alone
                check_finite_logits(state.next_logits)
                token = self._next_token(state)
            except Exception as error:  # noqa: BLE001
                state.next_logits, state.finish_reason, state.error = None, "error", str(error)
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
        raw_logits, state.next_logits = state.next_logits, None
        token = state.sampler.sample(raw_logits)
        if token is None:  # a dead end of the grammar ends this sequence, not its neighbours
            state.finish_reason = "stop"
            return 0
        if self.model.is_end_of_generation(token):
            state.finish_reason = "stop"
            return token
        state.sampler.accept(token)
        if sampling.logprobs is not None:
            state.logprobs.append(token_logprob(raw_logits, token, sampling.logprobs))
        state.generated.append(token)
        self._update_text(state)
        if not state.done and len(state.generated) >= sampling.max_tokens:
            state.finish_reason = "length"
        return token

    def _update_text(self, state: SequenceState) -> None:
        """Decode only the newest token (a character split across tokens waits in the decoder), so the
        text equals decoding the whole generation at once without costing that on every token."""
        before = len(state.decoded)
        raw = self.model.detokenize(state.generated[-1:])
        piece = raw
        if state.n_bytes == 0 and state.generated[0] == self.model.token_bos() and raw.startswith(b" "):
            piece = raw[1:]  # as Llama.detokenize does to a whole output that starts with BOS
        state.n_bytes += len(raw)
        state.decoded += state.decoder.decode(piece)
        text = state.decoded
        # no stop string was in the text before, so a new one ends inside the new characters
        if any(text.find(word, max(0, before - len(word) + 1)) >= 0 for word in state.sampling.stop):
            for word in state.sampling.stop:
                cut = text.find(word)
                if cut >= 0:
                    text = text[:cut]
            state.finish_reason = "stop"
        if state.on_piece is not None and len(text) > len(state.text):
            state.on_piece(text[len(state.text) :])
        state.text = text

    def _prompt_rows(self, budget: int, states: list[SequenceState] | None = None) -> list:
        """Prompt tokens still to decode, oldest sequence first, up to `budget` rows. A conditioned
        prompt is never split: when it does not fit whole, it and every younger prompt wait."""
        rows = []
        for state in self._by_age() if states is None else states:
            if state.conditioned and state.n_decoded == 0 and len(state.prompt) > budget:
                break
            while budget > 0 and state.n_decoded < len(state.prompt):
                pos = state.n_decoded
                rows.append((state, state.prompt[pos], pos, False, pos == len(state.prompt) - 1))
                state.n_decoded += 1
                budget -= 1
        return rows

    def _by_age(self) -> list[SequenceState]:
        return sorted(self.active, key=lambda s: s.joined)

    def _decode(self, rows: list[tuple[SequenceState, int, int, bool, bool]]) -> None:
        """rows: (state, token, position, is_generated, wants_logits)."""
        if self._program_stale:
            compile_program([s.controls if s else [] for s in self.slots],
                            n_slots=len(self.slots)).install(self.model.hook)
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
            state.next_logits = self.model.context.logits_ith(row).copy()
            state.ready_since = self.n_decodes


class SequenceError(RuntimeError):
    """One sequence of a batch failed alone (its steering, its sampling, or NaN/Inf in its logits)."""


def check_finite_logits(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        raise FloatingPointError("the model's logits for this sequence hold NaN or Inf (its steering is too strong)")


def generate_batch(
    model: HookedModel,
    prompts: Sequence[str],
    controls=None,
    max_tokens: int | Sequence[int] = 64,
    *,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = DEFAULTS.top_k,
    top_p: float | Sequence[float] = DEFAULTS.top_p,
    min_p: float | Sequence[float] = DEFAULTS.min_p,
    repeat_penalty: float | Sequence[float] = DEFAULTS.repeat_penalty,
    repeat_last_n: int | Sequence[int] = DEFAULTS.repeat_last_n,
    presence_penalty: float | Sequence[float] = DEFAULTS.presence_penalty,
    frequency_penalty: float | Sequence[float] = DEFAULTS.frequency_penalty,
    seed: int | Sequence[int | None] | None = None,
    stop: Sequence[str] | Sequence[Sequence[str]] | None = None,
    on_token: Callable[[int, str], None] | None = None,
    details: bool = False,
) -> list[str] | list[BatchCompletion]:
    """Complete several prompts side by side, each with its own controls, through llama.cpp's
    sampler chain (greedy unless a temperature is given; the other settings default to DEFAULTS)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    controls = [None] * len(prompts) if controls is None else list(controls)
    if len(controls) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(controls)} controls")
    if len(prompts) > model.n_seq_max:
        raise ValueError(f"{len(prompts)} prompts but the context runs at most n_seq_max={model.n_seq_max} sequences")
    samplings = sequence_samplings(len(prompts), max_tokens, seed, stop, temperature=temperature, top_k=top_k,
                                   top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                   presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    return run_sequences(model, [model.tokenize_prompt(p) for p in prompts], controls, samplings, on_token, details)


def run_sequences(model: HookedModel, token_lists: list[list[int]], controls: list, samplings: list[SequenceSampling],
                  on_token: Callable[[int, str], None] | None = None, details: bool = True):
    """Tokenized prompts, each with its controls (anything normalize_controls takes) and sampling,
    generated to the end in one ContinuousBatch; their BatchCompletions (texts unless `details`)."""
    per_slot = [normalize_controls(model, c) for c in controls]
    needed = sum(len(tokens) + sampling.max_tokens for tokens, sampling in zip(token_lists, samplings))
    if needed > model.n_ctx():
        raise ValueError(f"prompts plus max_tokens need {needed} KV cells, more than n_ctx={model.n_ctx()} "
                         "(shared by all sequences)")
    with ContinuousBatch(model) as batch:
        states = [
            batch.add(tokens, items, sampling, index=i,
                      on_piece=None if on_token is None else (lambda piece, i=i: on_token(i, piece)))
            for i, (tokens, items, sampling) in enumerate(zip(token_lists, per_slot, samplings))
        ]
        while batch.active:
            batch.step()
    failed = next((s for s in states if s.error is not None), None)
    if failed is not None:
        raise SequenceError(f"prompt {failed.index}: {failed.error}")
    return [s.result() for s in states] if details else [s.text for s in states]
