"""Measurements decoded side by side: every steering setting of a sweep in the same llama_decode calls.

A measurement is a list of units. A unit is one setting (a list of Interventions; [] is the plain
model) on one text: a prefix decoded once, then optional branches (continuations), each its own KV
sequence that shares the prefix's cells (the prefix rows belong to every branch's sequence, which a
unified cache allows). Units are packed whole into decodes (rows <= n_batch, sequences <=
n_seq_max, logits rows <= a memory budget), so each decode starts from an empty cache. A
sequence's hook slot is its sequence id, and the per-slot program steers each slot with its
unit's setting: plain addition runs in the hook there, which has the bits of llama.cpp's adapter,
so a unit sees the logits it would see alone under `model.set_control` (up to the batch-size
numerics of quantized models; the tiny F32 test model is batch-invariant). Each unit's logits go
to its `consume` callback in unit order, as views valid only during the call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ggsteer.generation import per_slot_steering
from ggsteer.model import SteeredModel
from ggsteer.runtime.batch import OwnedBatch
from ggsteer.steering.interventions import Intervention
from ggsteer.steering.program import compile_program

# Logit rows decoded at once: 128 MiB of float32 logits (128 rows of Gemma 3's vocabulary)
LOGITS_BUDGET_BYTES = 128 * 2**20

# setting of a unit: index into the measurement's list of settings
Settings = Sequence[Sequence[Intervention]]


@dataclass(eq=False)
class Unit:
    """One setting on one text; `consume([prefix rows, branch 0 rows, ...])` gets the wanted logits."""

    setting: int
    prefix: list[int]
    prefix_wants: range | list[int]  # prefix positions whose logits are wanted (ascending)
    consume: Callable[[list[np.ndarray]], None]
    branches: list[list[int]] = field(default_factory=list)
    branch_wants: list[range | list[int]] = field(default_factory=list)  # positions within each branch
    # rows at positions >= this are decoded as generated tokens (for `when` gating); None: all prompt
    generated_from: int | None = None

    @property
    def n_rows(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)

    @property
    def n_outputs(self) -> int:
        return len(self.prefix_wants) + sum(len(w) for w in self.branch_wants)

    @property
    def n_sequences(self) -> int:
        return max(1, len(self.branches))


def max_output_rows(model: SteeredModel) -> int:
    """Logits rows per decode within LOGITS_BUDGET_BYTES (at least one, at most n_batch)."""
    return min(model.n_batch, max(1, LOGITS_BUDGET_BYTES // (4 * model.n_vocab())))


def pack_units(units: Sequence[Unit], n_batch: int, n_seq_max: int, max_outputs: int) -> list[list[Unit]]:
    """Consecutive units per decode; a unit over the logits budget goes alone."""
    groups: list[list[Unit]] = []
    current: list[Unit] = []
    rows = seqs = outputs = 0
    for unit in units:
        if unit.n_rows > n_batch:
            raise ValueError(f"a text of {unit.n_rows} tokens does not fit n_batch={n_batch} (raise n_batch)")
        if unit.n_sequences > n_seq_max:
            raise ValueError(f"a text with {unit.n_sequences} continuations needs more than "
                             f"n_seq_max={n_seq_max} sequences")
        full = (rows + unit.n_rows > n_batch or seqs + unit.n_sequences > n_seq_max
                or outputs + unit.n_outputs > max_outputs)
        if current and full:
            groups.append(current)
            current, rows, seqs, outputs = [], 0, 0, 0
        current.append(unit)
        rows, seqs, outputs = rows + unit.n_rows, seqs + unit.n_sequences, outputs + unit.n_outputs
    if current:
        groups.append(current)
    return groups


class SideBySide:
    """Decodes packed units under their settings; use as a context manager (it leaves the model
    with the controls it had, its cache empty)."""

    def __init__(self, model: SteeredModel, settings: Settings):
        self.model = model
        self.settings = [list(items) for items in settings]
        self.n_vocab = model.n_vocab()
        self.batch: OwnedBatch | None = None
        self._installed: tuple[int, ...] | None = None
        self._session = contextlib.ExitStack()

    def __enter__(self) -> "SideBySide":
        # a prefix row belongs to every branch's sequence of its unit
        self.batch = self._session.enter_context(per_slot_steering(self.model, seqs_per_row=self.model.n_seq_max))
        return self

    def __exit__(self, *exc) -> None:
        self._session.close()

    def pack(self, units: Sequence[Unit]) -> list[list[Unit]]:
        return pack_units(units, self.model.n_batch, self.model.n_seq_max, max_output_rows(self.model))

    def decode(self, group: list[Unit]) -> None:
        """One llama_decode of the group's units, then each unit's `consume`."""
        batch = self.batch
        batch.clear()
        slot_settings: list[int] = []
        spans: list[list[tuple[int, int]]] = []  # per unit, per piece: its range of logits rows
        n_outputs = 0
        generated: list[bool] = []
        for unit in group:
            seqs = list(range(len(slot_settings), len(slot_settings) + unit.n_sequences))
            slot_settings += [unit.setting] * len(seqs)
            pieces = [(unit.prefix, unit.prefix_wants, seqs, 0)]
            pieces += [(b, w, [seqs[k]], len(unit.prefix))
                       for k, (b, w) in enumerate(zip(unit.branches, unit.branch_wants))]
            unit_spans = []
            for tokens, wants, piece_seqs, start in pieces:
                wanted = set(wants)
                for offset, token in enumerate(tokens):
                    batch.add_shared(token, start + offset, piece_seqs, offset in wanted)
                    generated.append(unit.generated_from is not None and start + offset >= unit.generated_from)
                unit_spans.append((n_outputs, n_outputs + len(wanted)))
                n_outputs += len(wanted)
            spans.append(unit_spans)
        self._install(tuple(slot_settings))
        self.model.context.clear_memory()
        self.model.decode_batch(batch.batch, generated=np.array(generated, dtype=np.uint8))
        # llama.h: the requested logits are stored contiguously in batch order
        logits = self.model.context.logits(n_outputs)
        for unit, unit_spans in zip(group, spans):
            unit.consume([logits[lo:hi] for lo, hi in unit_spans])

    def _install(self, slot_settings: tuple[int, ...]) -> None:
        if slot_settings == self._installed:
            return
        per_slot = [self.settings[s] for s in slot_settings]
        if any(per_slot):
            compile_program(per_slot, n_slots=self.model.n_seq_max).install(self.model.hook)
        else:
            self.model.hook.clear_program()
        self._installed = slot_settings


def run_side_by_side(model: SteeredModel, settings: Settings, units: Sequence[Unit],
                     tick: Callable[[], None] | None = None, on_plan: Callable[[int], None] | None = None) -> int:
    """Decode every unit under its setting; returns the number of decodes (`on_plan` hears it
    before the first, `tick` after each)."""
    with SideBySide(model, settings) as runner:
        groups = runner.pack(units)
        if on_plan is not None:
            on_plan(len(groups))
        for group in groups:
            runner.decode(group)
            if tick is not None:
                tick()
    return len(groups)
