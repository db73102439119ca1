"""ggsteer vs llama.cpp's cvector-generator (`--method mean`): whole processes, same pairs, same machine.

    python benchmarks/cvector_compare.py [--pairs 72] [--rounds 3] [--cvector-generator PATH] [--per-layer]

Needs a `llama-cvector-generator` built from the llama.cpp that llama-cpp-python vendors (same
engine; on this machine build it portably: -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_BMI2=ON). Without it the script says so and exits 0.

Both sides get the same pairs: the first --pairs of `preset_dataset("happy")` (template + suffix, no
chat template: the default model is a base model), written once as cvector-generator's
--positive-file / --negative-file (one prompt a line, escapes as `string_process_escapes` reads
them) and as a JSONL file for ggsteer. Timed: each side as a whole process, wall time including
interpreter start, model load and writing the file:
  - `llama-cvector-generator --method mean -m MODEL --positive-file P --negative-file N -o OUT
    -t T -c 4096 -fa off` (ggsteer's context size and flash-attention setting);
  - `ggsteer train --pairs PAIRS.jsonl --method mean_diff --pool mean --threads T -o OUT` (the CLI
    as a user runs it: interpreter start, imports, model load, training, writing the file).
One untimed warm-up run of each side first (page cache, both files checked), then paired rounds,
the side that goes first alternating each round; the table gives the median of the per-round
speed-ups (cvector-generator s / ggsteer s) and their range.

What cvector-generator computes (tools/cvector-generator in llama.cpp): each line is tokenized with
the vocabulary's BOS and special tokens parsed (no chat template); the shorter of a pair is padded
with the token of " " to the other's length; each prompt is decoded alone, and the callback keeps
every `l_out-il` whose row count equals the prompt's tokens (all layers but the last, whose l_out
holds only the output row). Per pair it takes the token-aligned differences positive - negative,
drops rows that are zero (the shared prefix), concatenates all pairs' rows and, for `mean`,
averages them and normalises to unit length. So its direction is proportional to the sum over pairs
of (sum of positive rows - sum of negative rows), pad rows included: pairs weigh by token count.
ggsteer's pool="mean" mean_diff averages each prompt's rows first, so pairs weigh equally; the two
agree exactly only when every prompt has the same length. The vector measured at `l_out-i` is
written as `direction.(i+1)` (layers 1..n_layer-1 in the file): it is read back here with
`ControlVector.load(path, layer_offset=-1)` and compared with ggsteer's layer i (docs/methods.md,
"Conventions"). Both point negative -> positive; the signed cosines are checked too.

Run it on a quiet machine. Both engines use OpenMP, whose threads spin at each op's barrier; when
another process holds a core, every barrier waits for a time slice, and cvector-generator's many
small single-prompt decodes suffer far more than ggsteer's few batched ones (beside another job,
cvector-generator with -t 2 can take many times longer than with -t 1). The script prints
a caution when the load before it starts is above 0.5.

`--explain` adds, after the timed rounds, cvector-generator's pooling recomputed from ggsteer's own
token states (per pair: sum of positive rows - sum of negative rows, without pad rows), to tell the
pooling difference from the arithmetic (single-sequence vs batched decodes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_line, print_table, ratio_cells

from ggsteer import default_model_path
from ggsteer.model import DEFAULT_N_CTX
from ggsteer.train import preset_dataset
from ggsteer.train.rounds import DEFAULT_MAX_PAIRS
from ggsteer.vectors import ControlVector

DEFAULT_BINARY = "/tmp/lcpp-build/bin/llama-cvector-generator"

GGSTEER_CLI = "import sys; from ggsteer.cli.main import main; sys.exit(main(sys.argv[1:]))"


def escape_line(text: str) -> str:
    """One prompt as a line that llama.cpp's string_process_escapes turns back into `text`."""
    if not text:
        raise ValueError("cvector-generator skips empty lines: an empty prompt cannot be written")
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def write_inputs(pairs, folder: Path) -> dict[str, Path]:
    paths = {name: folder / name for name in ("positive.txt", "negative.txt", "pairs.jsonl")}
    paths["positive.txt"].write_text("".join(escape_line(e.positive) + "\n" for e in pairs), encoding="utf-8")
    paths["negative.txt"].write_text("".join(escape_line(e.negative) + "\n" for e in pairs), encoding="utf-8")
    paths["pairs.jsonl"].write_text(
        "".join(json.dumps({"positive": e.positive, "negative": e.negative}) + "\n" for e in pairs), encoding="utf-8")
    return paths


def run_process(command: list[str], log: Path) -> float:
    """Wall seconds of one whole process; its output goes to `log`, and a failure stops the script."""
    with open(log, "w") as out:
        start = time.perf_counter()
        code = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT).returncode
        elapsed = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"command failed ({code}): {' '.join(command)}\n" + "\n".join(tail))
    return elapsed


def signed_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def explain(model_path: Path, pairs, threads: int, layers: list[int]) -> dict[int, np.ndarray]:
    """cvector-generator's pooling over ggsteer's own token states (pad rows aside), per layer."""
    from ggsteer import SteeredModel

    model = SteeredModel(str(model_path), n_threads=threads)
    prompts = [text for e in pairs for text in (e.positive, e.negative)]
    states = model.hidden_states(prompts, layers=layers, pool="all", progress=False)  # [n_tokens, layers, n_embd]
    model.close()
    total = sum(s.sum(axis=0, dtype=np.float64) for s in states[0::2]) - sum(
        s.sum(axis=0, dtype=np.float64) for s in states[1::2])
    return {il: total[k] for k, il in enumerate(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cvector-generator", default=DEFAULT_BINARY,
                        help=f"llama.cpp binary (default {DEFAULT_BINARY})")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--pairs", type=int, default=72, help="first N pairs of preset_dataset('happy') (default 72)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads on both sides")
    parser.add_argument("--cvector-flash-attn", choices=("on", "off", "auto"), default="off",
                        help="cvector-generator's -fa (default off: ggsteer's llama-cpp-python context has it off)")
    parser.add_argument("--explain", action="store_true",
                        help="also recompute cvector-generator's pooling from ggsteer's token states")
    parser.add_argument("--per-layer", action="store_true", help="also print the cosines of every layer")
    parser.add_argument("--keep", type=Path, default=None, help="keep the inputs, logs and vector files in this folder")
    args = parser.parse_args()

    binary = shutil.which(args.cvector_generator) or args.cvector_generator
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"cvector-generator comparison skipped: no executable at {args.cvector_generator} "
              "(--cvector-generator PATH)")
        return
    if args.pairs < 1 or args.rounds < 1:
        sys.exit("--pairs and --rounds must be at least 1")

    model_path = Path(default_model_path() if args.model is None else args.model).resolve()
    pairs = preset_dataset("happy")[: args.pairs]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="cvector_compare_")) if args.keep is None else args.keep
    paths = write_inputs(pairs, folder)
    cv_out, gg_out = folder / "cvector.gguf", folder / "ggsteer.gguf"
    threads = str(args.threads)

    cvector_cmd = [binary, "-m", str(model_path), "--positive-file", str(paths["positive.txt"]),
                   "--negative-file", str(paths["negative.txt"]), "--method", "mean", "-o", str(cv_out),
                   "-t", threads, "-c", str(DEFAULT_N_CTX), "-fa", args.cvector_flash_attn]
    ggsteer_cmd = [sys.executable, "-c", GGSTEER_CLI, "train", "--pairs", str(paths["pairs.jsonl"]),
                   "--model", str(model_path), "--threads", threads, "--method", "mean_diff", "--pool", "mean",
                   "-o", str(gg_out), "--force"]
    # its default: rounds on at most DEFAULT_MAX_PAIRS of the pairs (docs/efficient-training.md)
    ggsteer_label = f"ggsteer train --method mean_diff --pool mean (rounds, up to {DEFAULT_MAX_PAIRS} pairs)"
    sides = {
        "cvector": lambda: run_process(cvector_cmd, folder / "cvector.log"),
        "ggsteer": lambda: run_process(ggsteer_cmd, folder / "ggsteer.log"),
    }

    load_before = os.getloadavg()[0]
    warm = {name: run() for name, run in sides.items()}  # untimed: page cache, and both must work
    times: dict[str, list[float]] = {"cvector": [], "ggsteer": []}
    speedups = []
    for r in range(args.rounds):
        order = ["cvector", "ggsteer"] if r % 2 == 0 else ["ggsteer", "cvector"]
        measured = {name: sides[name]() for name in order}
        for name, t in measured.items():
            times[name].append(t)
        speedups.append(measured["cvector"] / measured["ggsteer"])

    g = ControlVector.load(gg_out)
    c = ControlVector.load(cv_out, layer_offset=-1)  # direction.(i+1) was measured at l_out-i
    shared = sorted(set(g.layers) & set(c.layers))
    if not shared:
        sys.exit(f"no shared layers: ggsteer {g.layers}, cvector-generator (measured at) {c.layers}")
    cos = {il: signed_cos(g.directions[il], c.directions[il]) for il in shared}
    abs_cos = [abs(v) for v in cos.values()]
    flipped = [il for il, v in cos.items() if v < 0]
    cv_norms = [float(np.linalg.norm(c.directions[il])) for il in shared]

    n_prompts = 2 * len(pairs)
    print_table(
        f"ggsteer vs llama.cpp cvector-generator --method mean on {model_path.name}: {len(pairs)} pairs, "
        f"{args.threads} threads, whole processes, median of {args.rounds} alternated rounds "
        f"({machine_line()}, load {os.getloadavg()[0]:.2f})",
        ["pairs / prompts", "ggsteer side", "cvector-generator s", "ggsteer s", "speed-up (median)", "range",
         f"median |cos|, layers {shared[0]}..{shared[-1]}", "min |cos|", "negative cos"],
        [[f"{len(pairs)} / {n_prompts}", ggsteer_label, f"{statistics.median(times['cvector']):.2f}",
          f"{statistics.median(times['ggsteer']):.2f}", *ratio_cells(speedups),
          f"{statistics.median(abs_cos):.4f}", f"{min(abs_cos):.4f}", str(len(flipped))]],
    )
    print(f"warm-up (untimed): cvector-generator {warm['cvector']:.2f} s, ggsteer {warm['ggsteer']:.2f} s. "
          f"cvector-generator's directions are unit length (norms {min(cv_norms):.4f}..{max(cv_norms):.4f}); "
          f"its direction.(i+1) is compared with ggsteer's layer i. Layers without a counterpart: "
          f"ggsteer {sorted(set(g.layers) - set(shared)) or 'none'}, "
          f"cvector-generator {sorted(set(c.layers) - set(shared)) or 'none'}.")

    if load_before > 0.5:
        print(f"caution: the 1-minute load was {load_before:.2f} before the first run; with other work on the cores "
              f"OpenMP's spinning barriers slow cvector-generator's many small decodes far more than ggsteer's "
              f"(see the docstring): these times are not a fair comparison.")

    layer_rows = [[str(il), f"{cos[il]:+.4f}"] for il in shared]
    header = ["layer (l_out-i)", "cos ggsteer / cvector-generator"]
    if args.explain:
        reference = explain(model_path, pairs, args.threads, shared)
        ref_cv = [abs(signed_cos(reference[il], c.directions[il])) for il in shared]
        ref_gg = [abs(signed_cos(reference[il], g.directions[il])) for il in shared]
        print(f"--explain: cvector-generator's pooling over ggsteer's token states agrees with cvector-generator "
              f"at median |cos| {statistics.median(ref_cv):.4f} (min {min(ref_cv):.4f}) and with ggsteer's "
              f"pool=mean at {statistics.median(ref_gg):.4f} (min {min(ref_gg):.4f}).")
        header += ["|cos| token-sum ref / cvector-generator", "|cos| token-sum ref / ggsteer"]
        layer_rows = [row + [f"{a:.4f}", f"{b:.4f}"] for row, a, b in zip(layer_rows, ref_cv, ref_gg)]
    if args.per_layer:
        print_table("Per-layer cosines", header, layer_rows)
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
