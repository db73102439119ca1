"""Load test of `ggsteer serve`: many concurrent clients with mixed requests, in rounds.

    python benchmarks/serve_load.py [--clients 64] [--duration 60] [--rounds 2] [--model PATH]

Starts `ggsteer serve` as a subprocess (default model unless --model; random gap-unit vectors on the
middle layers) and runs --clients clients for --duration seconds per round. Each client sends
requests one after another, each drawn at random: completions or chat, streamed or not, 0-2
vectors with random strengths, 4-96 tokens, greedy or sampled; about one in ten hangs up early
(a non-streaming request after a random delay, a stream after its first pieces). When the round's
time is up every client hangs up on the request it is waiting for ("cut at the end"), so the
server must cancel up to --clients requests at once.

With --poison (a share of requests, default 0.1) clients also send poisonous requests mixed in
(issue 24's list: first_k 1e300, a 20-million-layer range, logit_bias "²", a json_schema string,
lone surrogates, a body nested 5,000 deep, odd vector paths, a vector of 1e30 values, ?overwrite=2,
foreign Host names). Each must get a 4xx in OpenAI's error shape; the columns count them apart from
the well-formed requests, whose failures must stay 0 whatever the poison does.

Every completed reply is checked: HTTP 200, the OpenAI shape, finish_reason "stop" or "length",
`usage.prompt_tokens` equal to the prompt's token count (tokenised here with the same vocabulary),
`completion_tokens` at most max_tokens and equal to it when finish_reason is "length",
total = prompt + completion; a stream must end with a finish_reason chunk and [DONE], with no error
event. Anything else is a failure (429s are counted apart). After each round: the server's resident
memory once idle, /health, and /metrics (nothing processing or queued). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import llama_cpp
import numpy as np
from _common import machine_line, print_table

from ggsteer import default_model_path
from ggsteer.chat_format import chat_prompt
from ggsteer.vectors import ControlVector

PROMPTS = ["Once upon a time, in a small village by the sea,", "The best thing about my job is",
           "Yesterday I went to the market and", "Dear diary, today", "Write a very long story about a dragon."]
VECTORS = ("happy", "calm", "formal")
LENGTHS = (4, 16, 48, 96)
HANG_UP = 0.1  # share of requests whose client goes away early
CANCELLED = 'ggsteer_requests_total{outcome="cancelled"}'


def write_vectors(vocab: llama_cpp.Llama, directory: Path) -> None:
    """Random gap-unit vectors of realistic size on the middle layers (as benchmarks/serve.py)."""
    rng = np.random.default_rng(0)
    n_layer, n_embd = vocab.metadata_n_layer, vocab.metadata_n_embd
    layers = range(max(1, n_layer // 4), max(2, 3 * n_layer // 4))
    for name in VECTORS:
        directions = {il: rng.normal(size=n_embd).astype(np.float32) * 2 for il in layers}
        hint = vocab.metadata.get("general.architecture", "unknown")
        ControlVector(directions, hint, {"unit": "gap", "method": "random"}).save(directory / f"{name}.gguf")


def open_vocab(model_path: str) -> llama_cpp.Llama:
    vocab = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    arch = vocab.metadata["general.architecture"]
    vocab.metadata_n_layer = int(vocab.metadata[f"{arch}.block_count"])
    vocab.metadata_n_embd = int(vocab.metadata[f"{arch}.embedding_length"])
    return vocab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, vectors: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from ggsteer.cli import main; sys.exit(main())", "serve",
               "--model", model_path, "--vectors", str(vectors), "--port", str(port),
               "--max-batch", str(args.max_batch),
               "--ctx-size", str(args.ctx_size), "--threads", str(args.threads)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))


def wait_until_up(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see its log")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the server did not come up in 300 s")
        time.sleep(0.5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# -- one request ----------------------------------------------------------------------------------


class PromptTokens:
    """Prompt token counts as the server computes them (same vocabulary, same chat formatting)."""

    def __init__(self, vocab: llama_cpp.Llama):
        self.vocab = vocab
        self.cache: dict[tuple, int] = {}

    def count(self, kind: str, prompt: str) -> int:
        if (kind, prompt) not in self.cache:
            text = (prompt if kind == "completion"
                    else chat_prompt(self.vocab, [{"role": "user", "content": prompt}]).text)
            self.cache[kind, prompt] = len(self.vocab.tokenize(text.encode(), add_bos=True, special=True))
        return self.cache[kind, prompt]


def random_request(rng: random.Random) -> dict:
    names = rng.sample(VECTORS, rng.choice((0, 0, 1, 2)))
    body = {"max_tokens": rng.choice(LENGTHS), "temperature": rng.choice((0, 0.8)), "seed": rng.randrange(1000),
            "steering": {name: round(rng.uniform(-1, 1), 2) for name in names}, "stream": rng.random() < 0.4}
    prompt = rng.choice(PROMPTS)
    kind = rng.choice(("completion", "chat"))
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return {"kind": kind, "prompt": prompt, "body": body, "hang_up": rng.random() < HANG_UP}


# -- poisonous requests ---------------------------------------------------------------------------


def poison_requests(n_embd: int) -> list[tuple[str, str, bytes, dict]]:
    """(method, path, body, headers): each must be refused with a 4xx in OpenAI's error shape."""
    def body(value) -> bytes:
        return json.dumps(value).encode()  # ensure_ascii: a lone surrogate travels as its escape

    with tempfile.TemporaryDirectory() as tmp:
        huge = Path(tmp) / "huge.gguf"
        ControlVector({1: np.full(n_embd, 1e30, np.float32)}, "any", {"unit": "raw"}).save(huge)
        huge_bytes = huge.read_bytes()
    small = {"max_tokens": 4, "temperature": 0}

    def steer(setting) -> dict:
        return {"prompt": "x", **small, "steering": {"happy": setting}}

    octet = {"content-type": "application/octet-stream"}
    return [
        ("POST", "/v1/completions", body(steer({"strength": 0.5, "first_k": 1e300})), {}),
        ("POST", "/v1/completions", body(steer({"strength": 0.5, "first_k": 10**30})), {}),
        ("POST", "/v1/completions", body(steer({"strength": 0.5, "layers": "1-20000000"})), {}),
        ("POST", "/v1/completions", body({"prompt": "x", **small, "logit_bias": {"²": 1}}), {}),
        ("POST", "/v1/completions",
         body({"prompt": "x", **small, "response_format": {"type": "json_schema", "json_schema": "x"}}), {}),
        ("POST", "/v1/completions", body({"prompt": "a \ud800", **small}), {}),
        ("POST", "/v1/chat/completions", body({"messages": [{"role": "system", "content": "\ud800"}], **small}), {}),
        ("POST", "/v1/completions", b'{"prompt": "x", "m": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
        ("POST", "/v1/vectors/load", body({"path": "a" * 295 + ".gguf"}), {}),
        ("POST", "/v1/vectors/load", body({"path": "\ud800.gguf"}), {}),
        ("PUT", "/v1/vectors/huge", huge_bytes, octet),
        ("PUT", "/v1/vectors/happy?overwrite=2", b"GGUF", octet),
        ("GET", "/v1/vectors", b"", {"host": "[::1]evil.com"}),
        ("GET", "/v1/vectors", b"", {"host": "localhost:evil.com"}),
    ]


async def one_poison(http: httpx.AsyncClient, poison: tuple) -> str:
    """'4xx' when refused in OpenAI's error shape; otherwise what came back."""
    method, path, body, headers = poison
    response = await http.request(method, path, content=body, headers={"content-type": "application/json", **headers})
    try:
        error = response.json()["error"]
        shaped = set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    except (ValueError, KeyError, TypeError):
        shaped = False
    if 400 <= response.status_code < 500 and shaped:
        return "4xx"
    return f"{method} {path[:40]}: HTTP {response.status_code}{'' if shaped else ' (not the OpenAI shape)'}"


def check_reply(request: dict, reply: dict, prompt_tokens: int) -> str | None:
    """None if the non-streamed reply is well-formed with exact usage, else what is wrong."""
    choice = reply["choices"][0]
    text = choice.get("text") if request["kind"] == "completion" else choice["message"]["content"]
    if not isinstance(text, str):
        return "no text"
    usage, max_tokens = reply["usage"], request["body"]["max_tokens"]
    if choice["finish_reason"] not in ("stop", "length"):
        return f"finish_reason {choice['finish_reason']!r}"
    if usage["prompt_tokens"] != prompt_tokens:
        return f"prompt_tokens {usage['prompt_tokens']} != {prompt_tokens}"
    if not 0 <= usage["completion_tokens"] <= max_tokens:
        return f"completion_tokens {usage['completion_tokens']} > max_tokens {max_tokens}"
    if choice["finish_reason"] == "length" and usage["completion_tokens"] != max_tokens:
        return f"finish_reason length after {usage['completion_tokens']} of {max_tokens} tokens"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return "total_tokens is not the sum"
    return None


async def send_stream(http: httpx.AsyncClient, path: str, request: dict) -> str | None:
    chunks, done = [], False
    async with http.stream("POST", path, json=request["body"]) as response:
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return f"error event: {chunk['error']['message']}"
            chunks.append(chunk)
            if request["hang_up"] and len(chunks) >= 3:
                return "hung up"
    if not done or not chunks or chunks[-1]["choices"][0]["finish_reason"] not in ("stop", "length"):
        return "stream did not end with a finish_reason and [DONE]"
    return None


async def one_request(http: httpx.AsyncClient, request: dict, prompts: PromptTokens, rng: random.Random) -> str | None:
    """None on a good reply; 'hung up', 'HTTP 429' or what was wrong otherwise."""
    path = "/v1/completions" if request["kind"] == "completion" else "/v1/chat/completions"
    if request["body"]["stream"]:
        return await send_stream(http, path, request)
    call = http.post(path, json=request["body"])
    try:
        response = await asyncio.wait_for(call, timeout=rng.uniform(0.1, 2.0) if request["hang_up"] else None)
    except TimeoutError:
        return "hung up"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    return check_reply(request, response.json(), prompts.count(request["kind"], request["prompt"]))


async def run_round(url: str, args, prompts: PromptTokens, round_index: int) -> dict:
    stats = {"sent": 0, "completed": 0, "hung_up": 0, "rejected": 0, "cut": 0, "failures": [], "latencies": [],
             "poison_sent": 0, "poison_refused": 0, "poison_problems": []}
    deadline = time.monotonic() + args.duration

    async def poison(rng: random.Random, http: httpx.AsyncClient) -> None:
        stats["poison_sent"] += 1
        try:
            outcome = await asyncio.wait_for(one_poison(http, rng.choice(args.poisons)),
                                             timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return
        if outcome == "4xx":
            stats["poison_refused"] += 1
        else:
            stats["poison_problems"].append(outcome)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(1000 * round_index + i)
        while time.monotonic() < deadline:
            if rng.random() < args.poison:
                await poison(rng, http)
                continue
            request = random_request(rng)
            stats["sent"] += 1
            start = time.perf_counter()
            try:
                # at the end of the round every client hangs up: the server must drop what is left
                problem = await asyncio.wait_for(one_request(http, request, prompts, rng),
                                                 timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                stats["cut"] += 1
                continue
            except Exception as error:  # noqa: BLE001 - a broken connection is a failure to report
                problem = f"{type(error).__name__}: {error}"
            if problem is None:
                stats["completed"] += 1
                stats["latencies"].append(time.perf_counter() - start)
            elif problem == "hung up":
                stats["hung_up"] += 1
            elif problem.startswith("HTTP 429"):
                stats["rejected"] += 1
                await asyncio.sleep(1)
            else:
                stats["failures"].append(problem)

    start = time.perf_counter()
    # one connection pool (one client object each would cost seconds of TLS set-up on a busy machine)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(args.clients)))
    stats["wall"] = time.perf_counter() - start
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--poison", type=float, default=0.1, help="share of requests that are poisonous (0: none)")
    parser.add_argument("--server-log", default=os.path.join(tempfile.gettempdir(), "ggsteer-serve-load.log"))
    args = parser.parse_args()
    model_path = str(args.model or default_model_path())
    vocab = open_vocab(model_path)
    prompts = PromptTokens(vocab)
    args.poisons = poison_requests(vocab.metadata_n_embd)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rows, all_failures, poison_problems = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_vectors(vocab, Path(tmp))
        process = start_server(model_path, Path(tmp), port, args)
        try:
            wait_until_up(url, process)
            for round_index in range(args.rounds):
                stats = asyncio.run(run_round(url, args, prompts, round_index))
                settle = time.monotonic() + 60
                while (m := metrics(url))["ggsteer_requests_processing"] + m["ggsteer_requests_queued"] > 0:
                    if time.monotonic() > settle:
                        all_failures.append(
                            f"round {round_index + 1}: still processing a minute after the clients stopped")
                        break
                    time.sleep(0.2)
                print(f"round {round_index + 1}: {m['ggsteer_decodes_total']:.0f} decodes took "
                      f"{m['ggsteer_decode_seconds_total']:.1f} s in all", file=sys.stderr)
                health = httpx.get(f"{url}/health", timeout=10).status_code
                if health != 200:
                    all_failures.append(f"round {round_index + 1}: /health answered {health}")
                latencies = sorted(stats["latencies"]) or [float("nan")]
                all_failures += stats["failures"]
                poison_problems += stats["poison_problems"]
                rows.append([round_index + 1, stats["sent"], stats["completed"], stats["hung_up"], stats["cut"],
                             stats["rejected"], len(stats["failures"]),
                             f"{np.percentile(latencies, 50):.2f}", f"{np.percentile(latencies, 95):.2f}",
                             f"{stats['completed'] / stats['wall']:.2f}", f"{rss_mb(process.pid):.0f}",
                             f"{m['ggsteer_requests_processing']:.0f}/{m['ggsteer_requests_queued']:.0f}",
                             f"{m['ggsteer_tokens_generated_total']:.0f}", f"{m[CANCELLED]:.0f}",
                             stats["poison_sent"], stats["poison_refused"], len(stats["poison_problems"])])
        finally:
            process.terminate()
            process.wait(60)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print_table(
        f"ggsteer serve under load: {args.clients} clients, {args.duration:g} s per round, max-batch {args.max_batch}, "
        f"{Path(model_path).name} ({machine_line()}; load average at the end {load})",
        ["round", "sent", "completed", "hung up", "cut at the end", "429", "failures", "p50 s", "p95 s", "completed/s",
         "server RSS MB", "processing/queued after", "tokens (total)", "cancelled (total)", "poison sent",
         "poison 4xx", "poison other"],
        rows,
    )
    if len(rows) >= 2:
        print(f"server memory from round 1 to round {len(rows)}: {float(rows[-1][10]) - float(rows[0][10]):+.0f} MB")
    for problem in sorted(set(all_failures))[:20]:
        print(f"failure: {problem} (x{all_failures.count(problem)})")
    for problem in sorted(set(poison_problems))[:20]:
        print(f"poison not refused with a 4xx: {problem} (x{poison_problems.count(problem)})")
    return 1 if all_failures or poison_problems else 0


if __name__ == "__main__":
    sys.exit(main())
