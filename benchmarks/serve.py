"""Throughput of `ggsteer serve` with 1, 4 and 8 concurrent clients, unsteered and mixed steering.

    python benchmarks/serve.py [--tokens 32] [--requests 3] [--clients 1,4,8]

The real server (uvicorn on a free loopback port, in this process) on the default model. Each
client sends `--requests` completions one after another (greedy, `--tokens` tokens each). "mixed":
half the clients steer (each with its own vector and strength, through the per-sequence hook), the
other half do not. tokens/s counts completion tokens as reported in `usage`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from _common import machine_line, print_table

from ggsteer import SteeredModel
from ggsteer.serve import ServerConfig, VectorRegistry, create_app
from ggsteer.vectors import ControlVector

PROMPTS = ["Once upon a time, in a small village by the sea,", "The best thing about my job is",
           "Yesterday I went to the market and", "Dear diary, today"]
MIXED_STEERING = [{"happy": 0.5}, {"calm": -0.5}, {"happy": -0.3, "calm": 0.3}, {"happy": 0.8}]


def write_vectors(model: SteeredModel, directory: Path) -> None:
    """Random gap-unit vectors of realistic size on the recommended middle layers (as benchmarks/steer.py)."""
    rng = np.random.default_rng(0)
    for name in ("happy", "calm"):
        directions = {il: rng.normal(size=model.n_embd).astype(np.float32) * 5 for il in range(3, 15)}
        ControlVector(directions, model.model_hint, {"unit": "gap", "method": "random"}).save(
            directory / f"{name}.gguf")


class BackgroundServer:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()


def client_body(client: int, request: int, mode: str, tokens: int) -> dict:
    steering = MIXED_STEERING[(client // 2) % len(MIXED_STEERING)] if mode == "mixed" and client % 2 else {}
    prompt = PROMPTS[(client + request) % len(PROMPTS)]
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "steering": steering}


def run_clients(url: str, n_clients: int, n_requests: int, mode: str, tokens: int) -> tuple[float, int, list[float]]:
    """(wall seconds, completion tokens, per-request latencies) for one concurrency level."""

    def one_client(client: int):
        done = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for request in range(n_requests):
                start = time.perf_counter()
                response = http.post("/v1/completions", json=client_body(client, request, mode, tokens))
                response.raise_for_status()
                done.append((time.perf_counter() - start, response.json()["usage"]["completion_tokens"]))
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = [r for client in pool.map(one_client, range(n_clients)) for r in client]
    wall = time.perf_counter() - start
    return wall, sum(n for _, n in results), [latency for latency, _ in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--clients", default="1,4,8")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    model = SteeredModel(n_ctx=4096, n_seq_max=max(levels), n_threads=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        write_vectors(model, Path(tmp))
        registry = VectorRegistry.load(tmp, model)
    app = create_app(model, registry, ServerConfig(max_batch=max(levels)))
    worker = app.state.server.worker
    rows = []
    with BackgroundServer(app) as url:
        run_clients(url, 1, 1, "none", 8)  # warm-up
        for n_clients in levels:
            for mode in ("none", "mixed"):
                batches_before = len(worker.batch_sizes)
                wall, n_tokens, latencies = run_clients(url, n_clients, args.requests, mode, args.tokens)
                sizes = worker.batch_sizes[batches_before:]
                rows.append([n_clients, mode, len(latencies), f"{wall:.2f}", f"{len(latencies) / wall:.2f}",
                             f"{n_tokens / wall:.1f}", f"{np.mean(latencies):.2f}", f"{np.mean(sizes):.1f}"])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print_table(
        f"ggsteer serve, /v1/completions, {args.tokens} tokens greedy, {args.requests} requests per client, "
        f"{model.model_name} ({machine_line()}; load average at the end {load})",
        ["clients", "steering", "requests", "wall s", "requests/s", "tokens/s", "mean latency s", "mean batch"],
        rows,
    )
    model.close()


if __name__ == "__main__":
    main()
