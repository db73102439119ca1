"""Bake time and peak memory on the default model (Gemma 3 270M, Q4_K_M).

Each bake runs in a fresh child process (its own peak RSS, read with os.wait4); rounds alternate
between the settings and the median time is reported with its range. Peak RSS is compared with
the model file and with the model's dequantized (float32) size.

    python benchmarks/bake.py [--model M.gguf] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
from ggsteer import ControlVector
from ggsteer.bake import bake_model
from ggsteer.bake.gguf_layout import read_layout
model, out, op = sys.argv[1:4]
layout = read_layout(model)
n_embd, n_layer = int(layout.hparam("embedding_length")), int(layout.hparam("block_count"))
rng = np.random.default_rng(0)
layers = list(range(3, min(15, n_layer)))
vector = ControlVector({il: rng.normal(size=n_embd).astype(np.float32) for il in layers}, layout.architecture,
                       {"unit": "gap"})
start = time.perf_counter()
report = bake_model(model, out, ablate=[vector], layers=layers, approximate=True, force=True)
print(json.dumps({"seconds": time.perf_counter() - start, "edited": len(report.edited_tensors),
                  "output_bytes": report.output_bytes, "input_bytes": report.input_bytes}))
"""


def run_child(model: str, out: str, op: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", CHILD, model, out, op], stdout=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    output = process.stdout.read().decode()
    process.stdout.close()
    if status != 0:
        raise RuntimeError(f"bake child failed with status {status}")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(wall=wall, peak_rss=usage.ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
    return result


def dequantized_bytes(model: str) -> int:
    from ggsteer.bake.gguf_layout import read_layout

    layout = read_layout(model)
    return sum(4 * info.n_rows * info.row_length for info in layout.tensors.values())


def main() -> None:
    from ggsteer import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = str(args.model or default_model_path())
    folder = Path(tempfile.mkdtemp(prefix="ggsteer-bake-bench-"))
    results: dict[str, list[dict]] = {"ablate": []}  # add is refused on Gemma 3 (plan.py)
    for _ in range(args.rounds):
        for op in results:
            results[op].append(run_child(model, str(folder / f"{op}.gguf"), op))
    size, dequantized = os.path.getsize(model), dequantized_bytes(model)
    print(f"model {Path(model).name}: {size / 1e6:.0f} MB on disk, {dequantized / 1e6:.0f} MB dequantized (float32); "
          f"{os.cpu_count()} cores, {args.rounds} rounds")
    print(f"{'bake (layers 3-14, approximate)':<40}{'time s (median, range)':>26}{'process s':>11}{'peak RSS MB':>13}"
          f"{'tensors edited':>16}{'size out/in':>13}")
    for runs in results.values():
        times = [r["seconds"] for r in runs]
        walls = [r["wall"] for r in runs]
        rss = max(r["peak_rss"] for r in runs)
        last = runs[-1]
        label = "ablate (writers orthogonalised)"
        print(f"{label:<40}{statistics.median(times):>12.1f} ({min(times):.1f}-{max(times):.1f}){'':>6}"
              f"{statistics.median(walls):>11.1f}{rss / 1e6:>13.0f}{last['edited']:>16}"
              f"{last['output_bytes'] / last['input_bytes']:>13.4f}")
    for op in results:
        (folder / f"{op}.gguf").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
