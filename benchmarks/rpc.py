"""A model split across two llama.cpp RPC workers on loopback vs the same model on this host.

    python benchmarks/rpc.py [--tokens 32] [--rounds 5] [--threads 2] [--worker-threads 1]

Generation tokens/s (unsteered, steered through llama.cpp's adapter, steered through ggsteer's
hook: ablate on 12 layers, whose rows the hook copies out of the workers and back) and training
time, each as a paired ratio to the local unsteered run. The copy path's cost per decode is the
ablate run's time per token minus the adapter run's, both on the workers. Loopback has no network
latency: on two machines add the round trips (a few per layer the hook touches).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
from _common import machine_line, paired_ratios, print_table, ratio_cells, tokens_per_second

from ggsteer import ControlVector, SteeredModel, TrainingWarning
from ggsteer.runtime.rpc import free_port, start_local_worker
from ggsteer.train import preset_dataset

STEERED_LAYERS = range(3, 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="this host's threads (the local model)")
    parser.add_argument("--worker-threads", type=int, default=1, help="threads of each worker")
    args = parser.parse_args()
    ports = [free_port(), free_port()]
    workers = [start_local_worker(port, threads=args.worker_threads) for port in ports]
    try:
        run(args, [f"127.0.0.1:{port}" for port in ports])
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()


def run(args, endpoints: list[str]) -> None:
    local = SteeredModel(n_threads=args.threads, n_threads_batch=args.threads)
    remote = SteeredModel(rpc_servers=endpoints, n_threads=args.threads, n_threads_batch=args.threads)
    rng = np.random.default_rng(0)
    vector = ControlVector({il: rng.normal(size=local.n_embd).astype(np.float32) * 5 for il in range(1, local.n_layer)},
                           local.model_hint, {"unit": "gap"})
    models = {"local": local, "remote": remote}
    copies = {}

    def generation(case: str | None) -> float:
        where, steering = ("local", None) if case is None else case.split(" ")
        model = models[where]
        if steering == "add":
            model.set_control(vector, 0.5, layers=STEERED_LAYERS)
        elif steering == "ablate":
            model.set_control(vector, 1.0, layers=STEERED_LAYERS, op="ablate")
        else:
            model.reset_control()
        before = model.hook.counts()["copy_path"]
        speed = tokens_per_second(model, args.tokens)
        copies[case] = (model.hook.counts()["copy_path"] - before) / args.tokens
        return speed

    pairs = preset_dataset("happy", max_suffixes=10)

    def training(case: str | None) -> float:
        model = models["local" if case is None else case]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrainingWarning)
            ControlVector.train(model, pairs, method="mean_diff", progress=False)
        return 1.0 / (time.perf_counter() - start)

    for model in models.values():
        tokens_per_second(model, 8)  # warm-up
    cases = ["local add", "remote none", "remote add", "remote ablate"]
    ratios, speeds = paired_ratios(generation, cases, args.rounds)
    train_ratios, train_speeds = paired_ratios(training, ["remote"], args.rounds)
    ms_per_token = {case: 1000.0 / statistics.median(speeds[case]) for case in cases}
    copy_ms = ms_per_token["remote ablate"] - ms_per_token["remote add"]
    setting = (f"two workers on loopback ({args.worker_threads} thread(s) each) vs this host ({args.threads} threads), "
               f"{local.model_name}, median of {args.rounds} paired rounds ({machine_line()})")
    rows = [["local, unsteered", f"{statistics.median(speeds[None]):.1f}", "1.000", "-", "0"]]
    labels = {"local add": "local, adapter", "remote none": "workers, unsteered", "remote add": "workers, adapter",
              "remote ablate": "workers, hook ablate (copy path)"}
    for case in cases:
        rows.append([labels[case], f"{statistics.median(speeds[case]):.1f}", *ratio_cells(ratios[case]),
                     f"{copies[case]:.0f}"])
    print_table(f"Generation, {args.tokens} tokens, greedy: {setting}",
                ["run", "tokens/s (median)", "ratio (median)", "ratio range", "copy-path ops per token"], rows)
    print(f"\ncopy path on the workers: {copy_ms:.2f} ms per decode for {len(STEERED_LAYERS)} layers "
          f"({copy_ms / len(STEERED_LAYERS):.3f} ms per layer)")
    local_s = 1.0 / statistics.median(train_speeds[None])
    remote_s = 1.0 / statistics.median(train_speeds["remote"])
    print_table(f"Training ({len(pairs)} pairs, mean_diff): {setting}",
                ["run", "seconds (median)", "time ratio (median)", "time ratio range"],
                [["local", f"{local_s:.2f}", "1.000", "-"],
                 ["workers", f"{remote_s:.2f}", *ratio_cells([1.0 / r for r in train_ratios["remote"]])]])
    remote.close()
    local.close()


if __name__ == "__main__":
    main()
