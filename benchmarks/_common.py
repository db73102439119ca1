"""Shared pieces of the benchmarks: a hook-free llama.cpp context and a table printer."""

from __future__ import annotations

import os
import platform
import statistics
import time

import llama_cpp

from ggsteer.runtime.batch import OwnedBatch
from ggsteer.train.capture import BatchDecoder, walk_plan
from ggsteer.train.capture_plan import CapturePlan, Piece


def machine_line() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{platform.python_implementation()} {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


class BareContext:
    """A llama.cpp context on the same model and settings as a SteeredModel, with no eval callback."""

    def __init__(self, steered_model):
        params = llama_cpp.llama_context_default_params()
        src = steered_model.context_params
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads", "n_threads_batch", "kv_unified",
                     "flash_attn_type", "type_k", "type_v"):
            setattr(params, name, getattr(src, name))
        self.ctx = llama_cpp.llama_init_from_model(steered_model.model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = params.n_batch
        self.n_seq_max = params.n_seq_max
        self.batch = OwnedBatch(self.n_batch)

    def decode_prompts(self, token_lists: list[list[int]], max_sequences: int) -> None:
        """Every prompt in full, packed like ggsteer's unshared capture: <= max_sequences and n_batch tokens."""
        i = 0
        while i < len(token_lists):
            self.batch.clear()
            seq = 0
            while (i < len(token_lists) and seq < max_sequences
                   and self.batch.n_rows + len(token_lists[i]) <= self.n_batch):
                tokens = token_lists[i]
                for pos, token in enumerate(tokens):
                    self.batch.add(token, pos, seq, pos == len(tokens) - 1)
                seq += 1
                i += 1
            if llama_cpp.llama_decode(self.ctx, self.batch.batch) != 0:
                raise RuntimeError("llama_decode failed")
            llama_cpp.llama_memory_clear(self.memory, True)

    def decode_plan(self, plan: CapturePlan, max_sequences: int) -> int:
        """A capture plan's distinct tokens in the same batches and KV copies as ggsteer's capture,
        with one output row per sequence in each decode (its last row); returns the decodes made."""
        decoder = _BarePlanDecoder(self, max_sequences)
        for seg in plan.segments:  # the walk marks its progress on the plan: start afresh
            seg.done, seg.seq, seg.unscheduled_children = 0, -1, 0
        llama_cpp.llama_memory_clear(self.memory, True)
        decodes = 0
        for pieces in walk_plan(plan, decoder):
            decoder.decode(pieces)
            decodes += 1
        llama_cpp.llama_memory_clear(self.memory, True)
        return decodes

    def close(self) -> None:
        self.batch.close()
        llama_cpp.llama_free(self.ctx)


class _BarePlanDecoder(BatchDecoder):
    """BatchDecoder's sequence bookkeeping over a BareContext, decoding without any callback."""

    def __init__(self, bare: BareContext, max_sequences: int):
        self.bare = bare
        self.n_batch = bare.n_batch
        self.max_sequences = max_sequences
        self.memory = bare.memory
        self.free_seqs = list(range(bare.n_seq_max - 1, -1, -1))

    def decode(self, pieces: list[Piece]) -> None:
        batch = self.bare.batch
        batch.clear()
        for piece in pieces:
            seg = piece.segment
            for offset in range(piece.lo, piece.hi):
                batch.add(seg.tokens[offset], seg.start + offset, seg.seq, offset == piece.hi - 1)
        if llama_cpp.llama_decode(self.bare.ctx, batch.batch) != 0:
            raise RuntimeError("llama_decode failed")


GENERATION_PROMPT = "Once upon a time, in a small village by the sea,"


def tokens_per_second(model, n_tokens: int, prompt: str = GENERATION_PROMPT) -> float:
    """Greedy tokens per second of one sequence through Llama.generate (any llama_cpp.Llama), prompt
    decode included."""
    tokens = model.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    model.reset()
    start = time.perf_counter()
    for count, _ in enumerate(model.generate(tokens, temp=0.0, reset=True), start=1):
        if count == n_tokens:
            break
    return n_tokens / (time.perf_counter() - start)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def paired_ratios(measure, cases: list, rounds: int) -> tuple[dict, dict]:
    """Speed of each case relative to a baseline measured right before it, round after round.

    `measure(case)` returns a speed (higher is faster); `measure(None)` is the baseline. Pairing each
    case with an adjacent baseline run, and rotating the order each round, keeps the drift of a
    shared machine out of the ratios. Returns every case's ratios and speeds (baseline under None).
    """
    ratios: dict = {case: [] for case in cases}
    speeds: dict = {None: []} | {case: [] for case in cases}
    for r in range(rounds):
        for case in cases[r % len(cases):] + cases[: r % len(cases)]:
            base = measure(None)
            speed = measure(case)
            speeds[None].append(base)
            speeds[case].append(speed)
            ratios[case].append(speed / base)
    return ratios, speeds


def paired_times(pairs: dict, rounds: int) -> dict:
    """Time ratio case / baseline for each named (baseline, case) pair of callables, round after round.

    Each case runs right after its own baseline, and the order of the pairs rotates each round, so
    the drift of a shared machine stays out of the ratios. Returns, per name, the ratios and the two
    lists of seconds: {name: (ratios, baseline_seconds, case_seconds)}.
    """
    names = list(pairs)
    results = {name: ([], [], []) for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            baseline, case = pairs[name]
            t_base, t_case = seconds(baseline), seconds(case)
            ratios, base_times, case_times = results[name]
            ratios.append(t_case / t_base)
            base_times.append(t_base)
            case_times.append(t_case)
    return results


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratio_cells(ratios: list[float]) -> list[str]:
    """Median paired ratio and the range it came from."""
    ordered = sorted(ratios)
    return [f"{statistics.median(ordered):.3f}", f"{ordered[0]:.3f}-{ordered[-1]:.3f}"]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(f"\n{title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    print()


def load_models_without_extra_buffers() -> None:
    """Models loaded from now on skip llama.cpp's extra CPU buffer types (AMX, repacked weights): for a
    native llama.cpp build on a machine whose CPU advertises AMX that traps (README, install note)."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
