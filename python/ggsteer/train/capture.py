"""Capture the residual stream of every layer through the native eval callback.

Prompts are tokenized exactly as generation would, then laid out on a token trie: a prompt that is
a token-prefix of another is read off the longer one (causal attention makes its states equal),
and text shared by several prompts (a persona template, a reply shared by both sides of a pair)
is decoded once into one sequence whose KV cache is then copied (`llama_memory_seq_cp`, free in a
unified cache) to every sequence that continues it. Each `llama_decode` packs many trie segments
as separate sequences; the C++ callback copies only the wanted rows into a buffer.

Logits are requested only for rows whose last-block state is captured: llama.cpp keeps just the
output rows in the last block (it drops the others before it), and every output row also runs the
output head (Gemma 3's 262k-entry vocabulary: ~0.34 GFLOP a row, more than all its blocks). Without
the last layer a capture asks for no output row at all. And since nobody reads a capture's logits,
the callback ends each graph right after the deepest captured layer (`Hook.set_stop_after`): the
blocks after it and the output head never run, so even the last layer's output rows cost no head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from ggsteer.runtime.batch import OwnedBatch
from ggsteer.runtime.protocol import HookedModel
from ggsteer.train.capture_plan import (
    CapturePlan,
    Piece,
    Pool,
    Segment,
    plan_shared,
    plan_unshared,
    pool_rows,
    pools_per_prompt,
)

POOLS = ("last", "mean", "all")
# show a progress bar by default from this many prompts on
PROGRESS_MIN_PROMPTS = 64


class CaptureError(RuntimeError):
    """llama.cpp refused a decode, or the callback saw tensors it did not expect."""


@dataclass
class CaptureStats:
    """What a capture cost: llama_decode calls, tokens decoded and logits rows requested."""

    prompts: int = 0
    prompt_tokens: int = 0  # every prompt's tokens in full
    decodes: int = 0
    tokens: int = 0  # tokens decoded: the distinct token prefixes with prefix sharing
    output_rows: int = 0  # rows that asked llama.cpp for logits (each runs the output head)

    @property
    def tokens_per_decode(self) -> float:
        return self.tokens / self.decodes if self.decodes else 0.0


def validate_request(model: HookedModel, prompts, layers, pool: Pool | Sequence[Pool]) -> tuple[list[int], list[Pool]]:
    """The layers to capture and each prompt's pool; raises on a bad request."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if len(prompts) == 0:
        raise ValueError("no prompts given: the prompt list is empty")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is {type(prompt).__name__}, not str")
        if prompt == "":
            raise ValueError(f"prompt {i} is empty")
    pools = pools_per_prompt(pool, len(prompts))
    for name in set(pools):
        if isinstance(name, bool) or not (name in POOLS or (isinstance(name, int) and name >= 1)):
            raise ValueError(f"unknown pool {name!r}: choose one of {', '.join(POOLS)}, or a count of last tokens >= 1")
    return resolve_layers(layers, model.n_layer), pools


def resolve_layers(layers: Sequence[int] | None, n_layer: int) -> list[int]:
    """Requested layers in the given order; every layer when None."""
    if layers is None:
        return list(range(n_layer))
    resolved = [int(il) for il in layers]
    if not resolved:
        raise ValueError("layers is empty: give at least one layer or None for all")
    for il in resolved:
        if not 0 <= il < n_layer:
            raise ValueError(f"layer {il} is out of range: this model has layers 0..{n_layer - 1}")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"layers repeat: {resolved}")
    return resolved


def tokenize_prompts(model: HookedModel, prompts: Sequence[str]) -> list[list[int]]:
    n_ctx = model.n_ctx()
    token_lists = []
    for i, prompt in enumerate(prompts):
        tokens = model.tokenize_prompt(prompt)
        if not tokens:
            raise ValueError(f"prompt {i} produced no tokens")
        if len(tokens) > n_ctx:
            raise ValueError(f"prompt {i} has {len(tokens)} tokens, more than the context holds (n_ctx={n_ctx})")
        token_lists.append(tokens)
    return token_lists


class BatchDecoder:
    """Packs segments into llama_decode calls, giving each its own sequence id."""

    def __init__(self, model: HookedModel, layers: list[int], max_sequences: int):
        self.model = model
        self.layers = layers
        self.n_batch = model.n_batch
        self.max_sequences = max_sequences
        self.context = model.context
        self.batch = OwnedBatch(self.n_batch)
        self.free_seqs = list(range(model.n_seq_max - 1, -1, -1))
        self.outputs_needed = model.n_layer - 1 in layers

    def close(self) -> None:
        self.batch.close()
        self.context.clear_memory()

    def take_sequence(self, plan: CapturePlan, seg: Segment) -> bool:
        """Give `seg` a sequence holding its prefix; False when none is free."""
        parent = plan.segments[seg.parent] if seg.parent >= 0 else None
        if parent is not None and parent.unscheduled_children == 1:
            seg.seq = parent.seq  # the last child continues its parent's sequence
        elif not self.free_seqs:
            return False
        else:
            seg.seq = self.free_seqs.pop()
            if parent is not None:
                self.context.seq_cp(parent.seq, seg.seq)
        if parent is not None:
            parent.unscheduled_children -= 1
        seg.unscheduled_children = len(seg.children)
        return True

    def release(self, seg: Segment) -> None:
        self.context.seq_rm(seg.seq)
        self.free_seqs.append(seg.seq)

    def decode(self, pieces: list[Piece], store: np.ndarray, stats: CaptureStats) -> None:
        rows, out_rows, captures = [], [], []
        batch = self.batch
        batch.clear()
        n_outputs = 0
        for piece in pieces:
            seg = piece.segment
            for offset in range(piece.lo, piece.hi):
                capture = seg.wanted.get(offset)
                # only the last block needs its rows as outputs: llama.cpp drops the rest before it
                is_output = capture is not None and self.outputs_needed
                row = batch.add(seg.tokens[offset], seg.start + offset, seg.seq, is_output)
                if capture is not None:
                    rows.append(row)
                    out_rows.append(n_outputs if is_output else -1)
                    captures.append(capture)
                    n_outputs += is_output
        n_tokens = batch.n_rows
        buffer = None
        if rows:
            buffer = np.empty((len(rows), len(self.layers), self.model.n_embd), dtype=np.float32)
            self.model.hook.set_capture(
                self.layers, np.asarray(rows, np.int32), np.asarray(out_rows, np.int32), n_tokens, n_outputs, buffer
            )
        try:
            self.model.decode_batch(batch.batch)
        except RuntimeError as error:
            raise CaptureError(f"{error} (batch of {n_tokens} tokens in {len(pieces)} sequences)") from None
        finally:
            seen = self.model.hook.finish_capture() if rows else None
        stats.decodes += 1
        stats.tokens += n_tokens
        stats.output_rows += n_outputs
        if seen is not None:
            missing = [il for il in self.layers if seen[il] != 1]
            if missing:
                raise CaptureError(f"layers {missing} were not captured exactly once "
                                   f"(seen {[seen[i] for i in missing]})")
            store[captures] = buffer


def run_plan(model: HookedModel, plan: CapturePlan, layers: list[int], max_sequences: int, progress,
             stats: CaptureStats) -> np.ndarray:
    store = np.empty((plan.n_captures, len(layers), model.n_embd), dtype=np.float32)
    decoder = BatchDecoder(model, layers, max_sequences)
    total = sum(len(s.tokens) for s in plan.segments)
    model.reset()
    decoder.context.clear_memory()
    # nothing reads these decodes' logits: each graph ends at the deepest captured layer, so the
    # blocks after it and the output head (the dearest part of a row) never run
    model.hook.set_stop_after(max(layers))
    try:
        with tqdm(total=total, unit="tok", desc="capture", disable=not progress, leave=False) as bar:
            for pieces in walk_plan(plan, decoder):
                decoder.decode(pieces, store, stats)
                bar.update(sum(p.hi - p.lo for p in pieces))
    finally:
        model.hook.set_stop_after(-1)
        decoder.close()  # the KV cells of the blocks that never ran go with the rest
        model.reset()
    return store


def walk_plan(plan: CapturePlan, decoder: BatchDecoder) -> Iterator[list[Piece]]:
    """The plan's batches in decode order; each must be decoded before the next is asked for."""
    ready = list(reversed(plan.roots))  # a stack: depth first keeps few prefixes alive
    while ready:
        pieces = _next_batch(plan, decoder, ready)
        yield pieces
        for piece in pieces:
            seg = piece.segment
            if piece.hi < len(seg.tokens):
                continue  # the rest of it stays on the stack, holding its sequence
            ready.extend(reversed(seg.children))
            if not seg.children:
                decoder.release(seg)


def _next_batch(plan: CapturePlan, decoder: BatchDecoder, ready: list[int]) -> list[Piece]:
    """Fill one decode from the top of the stack. A segment that does not fit is split (its rest
    decoded in a later batch), so a batch is only short of n_batch when too few tokens are ready."""
    pieces: list[Piece] = []
    room = decoder.n_batch
    while ready and room > 0 and len(pieces) < decoder.max_sequences:
        seg = plan.segments[ready[-1]]
        if seg.done == 0 and not decoder.take_sequence(plan, seg):
            break
        hi = min(len(seg.tokens), seg.done + room)
        pieces.append(Piece(seg, seg.done, hi))
        room -= hi - seg.done
        seg.done = hi
        if hi == len(seg.tokens):
            ready.pop()
    if not pieces:
        raise CaptureError("no free sequence to continue the capture: raise n_seq_max")
    return pieces


def capture_hidden_states(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    pool: str = "last",
    batch_size: int | None = None,
    share_prefixes: bool = True,
    progress: bool | None = None,
    stats: CaptureStats | None = None,
):
    """States of `prompts` at `layers` (see SteeredModel.hidden_states); `stats`, when given, is
    filled with what the capture cost."""
    states = capture_pooled(model, prompts, pool, layers=layers, batch_size=batch_size, share_prefixes=share_prefixes,
                            progress=progress, stats=stats)
    return states if pool == "all" else np.stack(states)


def capture_pooled(
    model: HookedModel,
    prompts: Sequence[str],
    pools: Pool | Sequence[Pool],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    share_prefixes: bool = True,
    progress: bool | None = None,
    stats: CaptureStats | None = None,
) -> list[np.ndarray]:
    """Like capture_hidden_states with a pool per prompt, in one pass: one array per prompt. A pool
    may also be a count k: the mean of the prompt's last k tokens (all of them if it has fewer)."""
    resolved, pools = validate_request(model, prompts, layers, pools)
    max_sequences = model.n_seq_max if batch_size is None else int(batch_size)
    if not 1 <= max_sequences <= model.n_seq_max:
        raise ValueError(f"batch_size={batch_size} must be between 1 and the context's n_seq_max={model.n_seq_max}")
    token_lists = tokenize_prompts(model, prompts)
    make_plan = plan_shared if share_prefixes else plan_unshared
    plan = make_plan(token_lists, pools, model.n_batch)
    if progress is None:
        progress = len(prompts) >= PROGRESS_MIN_PROMPTS
    stats = CaptureStats() if stats is None else stats
    stats.prompts += len(token_lists)
    stats.prompt_tokens += sum(map(len, token_lists))
    store = run_plan(model, plan, resolved, max_sequences, progress, stats)
    return pool_rows(store, plan, pools)
