"""What makes a request's greedy output independent of the requests batched with it, and its cost.

    python benchmarks/deterministic.py [--tokens 48] [--copies 8] [--rounds 3]

On the default model (CPU): the same greedy prompt alone, then `--copies` copies of it decoded
together in one ContinuousBatch (what the server does with identical concurrent requests), under:

- "batched": ggsteer's default (every ready sequence in one llama_decode);
- "per-sequence": one llama_decode per sequence (each decode holds one sequence's rows, as alone);
- "no-extra-bufts": llama.cpp's repacked CPU weight buffers off (model param use_extra_bufts=False);
- "both": the two together.

Reported per mode: how many distinct texts the copies gave, how many equal the text alone, and the
batch's generated tokens/s (median of `--rounds`, with min..max) relative to "batched".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_lib
from _common import machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.generation import ContinuousBatch, SequenceSampling

PROMPT = "Once upon a time, in a small village by the sea,"


def per_sequence_batch(model):
    return ContinuousBatch(model, one_sequence_per_decode=True)


@contextlib.contextmanager
def without_extra_buffers(enabled: bool):
    """Models loaded inside get use_extra_bufts=False (llama-cpp-python does not expose the field)."""
    if not enabled:
        yield
        return
    original = llama_cpp_lib.llama_model_default_params

    def params():
        value = original()
        value.use_extra_bufts = False
        return value

    llama_cpp_lib.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp_lib.llama_model_default_params = original


def run(model, batch_class, copies: int, tokens: int) -> tuple[list[str], float]:
    prompt = model.tokenize_prompt(PROMPT)
    start = time.perf_counter()
    with batch_class(model) as batch:
        states = [batch.add(prompt, [], SequenceSampling(tokens)) for _ in range(copies)]
        while batch.active:
            batch.step()
    elapsed = time.perf_counter() - start
    return [s.text for s in states], sum(len(s.generated) for s in states) / elapsed


def load(args, no_extra: bool) -> SteeredModel:
    with without_extra_buffers(no_extra):
        return SteeredModel(args.model, n_ctx=4096, n_seq_max=args.copies, n_threads=args.threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    args = parser.parse_args()
    models = {False: load(args, False), True: load(args, True)}
    modes = {"batched": (False, ContinuousBatch), "per-sequence": (False, per_sequence_batch),
             "no-extra-bufts": (True, ContinuousBatch), "both": (True, per_sequence_batch)}
    alone = {name: run(models[no_extra], cls, 1, args.tokens)[0][0] for name, (no_extra, cls) in modes.items()}
    texts, rates = {}, {name: [] for name in modes}
    for _ in range(args.rounds):  # modes alternate within each round; ratios pair a round's runs
        for name, (no_extra, cls) in modes.items():
            texts[name], rate = run(models[no_extra], cls, args.copies, args.tokens)
            rates[name].append(rate)
    rows = []
    for name in modes:
        ratios = [rate / base for rate, base in zip(rates[name], rates["batched"])]
        rows.append([name, f"{len(set(texts[name]))}", f"{sum(t == alone[name] for t in texts[name])}/{args.copies}",
                     f"{statistics.median(rates[name]):.1f}",
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f})"])
    for model in models.values():
        model.close()
    title = f"{machine_line()}; llama_cpp {llama_cpp.__version__}; {args.copies} copies x {args.tokens} tokens, greedy"
    print_table(title, ["mode", "distinct texts", "equal to alone", "tokens/s", "vs batched"], rows)


if __name__ == "__main__":
    main()
