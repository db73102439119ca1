"""A real ggsteer server on loopback for the server tests, and what its replies are compared with."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import httpx
import numpy as np
import uvicorn

from ggsteer import SequenceSampling, SteeredModel
from ggsteer.chat_format import TRANSCRIPT_HEADER
from ggsteer.serve import ServerConfig, VectorRegistry, create_app
from ggsteer.serve.worker import Job
from ggsteer.vectors import ControlVector
from support.models import TIGHT_LLAMA_KWARGS

MAX_BATCH = 8
SERVER_MODEL_KWARGS = dict(n_ctx=512, n_batch=128, n_seq_max=MAX_BATCH, **TIGHT_LLAMA_KWARGS)
TOKENS = 12
GREEDY = {"temperature": 0, "max_tokens": TOKENS}
JSON = {"content-type": "application/json"}


def make_vector(n_embd: int, seed: int, unit: str = "gap", recommended: float | None = 0.5) -> ControlVector:
    rng = np.random.default_rng(seed)
    directions = {il: rng.normal(size=n_embd).astype(np.float32) * 1.5 for il in (1, 2)}
    metadata = {"unit": unit, "method": "mean_diff", "model_name": "tiny"}
    if recommended is not None:
        metadata["recommended_strength"] = recommended
    return ControlVector(directions, "llama", metadata)


def write_vectors(directory, n_embd: int = 48) -> dict[str, ControlVector]:
    """happy and honest (gap unit, as trained by ggsteer) and plain (raw unit, as from repeng)."""
    vectors = {"happy": make_vector(n_embd, 10), "honest": make_vector(n_embd, 11, recommended=None),
               "plain": make_vector(n_embd, 12, unit="raw", recommended=None)}
    directory.mkdir(parents=True, exist_ok=True)
    for name, vector in vectors.items():
        vector.save(directory / f"{name}.gguf")
    return {name: ControlVector.load(directory / f"{name}.gguf") for name in vectors}


@contextlib.contextmanager
def running_server(app):
    """uvicorn in a background thread on a free 127.0.0.1 port; yields the base URL, stops on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def tiny_server_model(path):
    """The tiny model with the server's settings, closed on exit."""
    model = SteeredModel(path, **SERVER_MODEL_KWARGS)
    try:
        yield model
    finally:
        model.close()


@contextlib.contextmanager
def serving(model, vector_dir, config: ServerConfig):
    """A real uvicorn on loopback serving `model` with the vectors in `vector_dir`; yields (base URL, app)."""
    app = create_app(model, VectorRegistry.load(vector_dir, model), config)
    with running_server(app) as url:
        yield url, app


@contextlib.contextmanager
def fresh_server(model_path, vector_dir, config: ServerConfig):
    """`serving` on a tiny model of its own (its own worker and KV cache), closed on exit."""
    with tiny_server_model(model_path) as model, serving(model, vector_dir, config) as pair:
        yield pair


def expected_result(reference, vectors, prompt, steering=None, stop=None, max_tokens=TOKENS):
    """The same request through generate_batch alone (raw-unit vectors as plain coefficients)."""
    controls = []
    for name, strength in (steering or {}).items():
        vector = vectors[name]
        as_gap = ControlVector(vector.directions, vector.model_hint, {**vector.metadata, "unit": "gap"})
        controls.append((as_gap, strength))
    return reference.generate_batch([prompt], [controls], max_tokens, temperature=0.0, stop=stop, details=True)[0]


def expected_text(reference, vectors, prompt, steering=None, stop=None, max_tokens=TOKENS) -> str:
    return expected_result(reference, vectors, prompt, steering, stop, max_tokens).text


def transcript(user_text: str) -> str:
    return TRANSCRIPT_HEADER + f"User: {user_text}" + "\nAssistant:"


def stream_events(client, path: str, body: dict) -> list:
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metrics(url: str) -> dict[str, float]:
    """/metrics parsed: 'name' or 'name{labels}' -> value; every line must be valid exposition format."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.fullmatch(r"# (HELP|TYPE) ggsteer_\w+ .+", line), line
            continue
        match = re.fullmatch(r'(ggsteer_\w+(?:\{\w+="[^"]*"\})?) (-?[0-9.e+]+)', line)
        assert match, line
        values[match[1]] = float(match[2])
    return values


class RecordingJob(Job):
    """A Job that records its events (with their order) instead of sending them to an event loop."""

    def __init__(self, tokens, max_tokens, delay_s=0.0, controls=()):
        super().__init__(tokens, list(controls), SequenceSampling(max_tokens), loop=None, events=None)
        self.delay_s = delay_s
        self.pieces: list[str] = []
        self.result = None
        self.error = None
        self.finished = threading.Event()

    def send(self, kind, value) -> None:
        if kind == "piece":
            self.pieces.append(value)
            time.sleep(self.delay_s)  # a slow consumer stretches this sequence over many decodes
        else:
            self.result, self.error = (value, None) if kind == "done" else (None, value)
            self.finished_at = time.monotonic()
            self.finished.set()


def wait_until(condition, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)
