"""What ggsteer's eval callback costs when nothing is steered: SteeredModel vs a plain llama_cpp.Llama.

    python benchmarks/idle_hook.py [--tokens 64] [--prompt-tokens 256] [--rounds 9] [--gpu-layers 0]

Both sides load the same GGUF with the same context settings (n_ctx, n_batch = n_ubatch, threads,
n_seq_max and the unified KV cache SteeredModel uses); the plain one has no eval callback at all.
Two workloads: greedy generation of --tokens tokens after a short prompt (one token per decode),
and evaluation of a --prompt-tokens prompt (one large decode). Each SteeredModel run is paired with
a plain run right before it, the order of the cases rotating each round; the table gives the median
of the paired speed ratios and their range. A last row compares with a plain Llama on
llama-cpp-python's own defaults (one sequence, no unified cache), for scale.
Target on CPU: SteeredModel / plain >= 0.99 on both workloads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import llama_cpp
from _common import machine_line, paired_ratios, print_table, ratio_cells, tokens_per_second
from llama_cpp import _internals

from ggsteer import SteeredModel

PROMPT = "Once upon a time, in a small village by the sea,"


def plain_llama(steered: SteeredModel, same_context: bool, **kwargs) -> llama_cpp.Llama:
    """A llama_cpp.Llama on the same file and settings; with `same_context`, also SteeredModel's
    n_seq_max and unified KV cache, on a context made the same way but without the callback."""
    params = steered.context_params
    llm = llama_cpp.Llama(model_path=steered.model_path, n_ctx=params.n_ctx, n_batch=params.n_batch,
                          n_ubatch=params.n_ubatch, verbose=False, **kwargs)
    if same_context:
        plain = llm.context_params
        plain.n_seq_max = params.n_seq_max
        plain.kv_unified = True
        old = llm._ctx
        llm._ctx = llm._stack.enter_context(
            contextlib.closing(_internals.LlamaContext(model=llm._model, params=plain, verbose=False))
        )
        old.close()
        llm.reset()
    return llm


def prompt_speed(llm: llama_cpp.Llama, n_tokens: int) -> float:
    text = " ".join([PROMPT] * (n_tokens // 8 + 1))
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)[:n_tokens]
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return len(tokens) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--gpu-layers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    kwargs = dict(n_threads=args.threads, n_gpu_layers=args.gpu_layers)
    steered = SteeredModel(**kwargs)
    plain = plain_llama(steered, True, **kwargs)
    defaults = plain_llama(steered, False, **kwargs)
    workloads = {
        f"generation, {args.tokens} tokens": lambda llm: tokens_per_second(llm, args.tokens),
        f"prompt, {args.prompt_tokens} tokens in one decode": lambda llm: prompt_speed(llm, args.prompt_tokens),
    }
    for measure in workloads.values():  # warm-up: first decodes repack weights
        measure(steered), measure(plain), measure(defaults)
    cases = [(name, side) for name in workloads for side in ("steered", "defaults")]

    def speed(case) -> float:
        if case is None:
            return workloads[current[0]](plain)
        return workloads[case[0]](steered if case[1] == "steered" else defaults)

    rows = []
    for name in workloads:
        current = [name]
        ratios, speeds = paired_ratios(speed, [c for c in cases if c[0] == name], args.rounds)
        rows.append([name, "plain Llama, same context settings, no callback", f"{statistics.median(speeds[None]):.1f}",
                     "1.000", "-"])
        rows.append([name, "SteeredModel, nothing steered (idle hook)",
                     f"{statistics.median(speeds[(name, 'steered')]):.1f}", *ratio_cells(ratios[(name, "steered")])])
        rows.append([name, "plain Llama, llama-cpp-python defaults",
                     f"{statistics.median(speeds[(name, 'defaults')]):.1f}", *ratio_cells(ratios[(name, "defaults")])])
    device = "GPU" if args.gpu_layers else "CPU"
    print_table(
        f"Idle hook ({device}): tokens/s of SteeredModel with no steering vs a plain llama_cpp.Llama, "
        f"median of {args.rounds} paired rounds, {steered.model_name} ({machine_line()})",
        ["workload", "run", "tokens/s (median)", "ratio to plain (median)", "ratio range"],
        rows,
    )
    for llm in (steered, plain, defaults):
        llm.close()


if __name__ == "__main__":
    main()
