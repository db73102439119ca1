"""The server under faults and overload (issue 12): a real uvicorn on loopback with the tiny model.

Faults are injected into the server's own model and worker: decodes made slow (so a request is
still generating when the test acts), decodes that raise, a worker loop that raises or whose
thread dies, batches that cannot be opened, and clients that disconnect. Every reply that does
complete is compared with the same request through generate_batch alone on a second model.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
from support.server import (
    GREEDY,
    expected_result,
    fresh_server,
    metrics,
)

from ggsteer.serve import ServerConfig

POISON = "~"  # a prompt with this character makes every decode of its prompt rows raise


@pytest.fixture(scope="module")
def vector_dir(vectors_and_dir):
    return vectors_and_dir[1]


@pytest.fixture(scope="module")
def vectors(vectors_and_dir):
    return vectors_and_dir[0]


@contextlib.contextmanager
def fault_server(tiny_model_path, vector_dir, **config):
    """A fresh server (its own model and worker); yields (base URL, SteeringServer)."""
    with fresh_server(tiny_model_path, vector_dir, ServerConfig(**{"max_batch": 4, **config})) as (url, app):
        yield url, app.state.server


@pytest.fixture
def served(tiny_model_path, vector_dir):
    with fault_server(tiny_model_path, vector_dir) as pair:
        yield pair


# -- fault injection ----------------------------------------------------------------------------


@contextlib.contextmanager
def patched_decodes(model, delay_s: float = 0.0, poison: bool = False, gate: threading.Event | None = None):
    """Each decode sleeps `delay_s` first (or waits for `gate`); with `poison`, a decode holding
    prompt rows of the POISON token raises."""
    original = model.decode_batch
    poison_token = model.tokenize(POISON.encode(), add_bos=False, special=False)[0]

    def decode(batch, generated=False):
        time.sleep(delay_s)
        if gate is not None:
            gate.wait()
        rows = range(batch.n_tokens)
        if poison and any(batch.token[i] == poison_token and not generated[i] for i in rows):
            raise RuntimeError("injected decode failure")
        return original(batch, generated)

    model.decode_batch = decode
    try:
        yield
    finally:
        del model.decode_batch





def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def post(url: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def in_thread(function, *args) -> dict:
    """Run function(*args) in a thread; the returned dict gets 'result' (or 'error') and 'done'."""
    box = {"done": threading.Event()}

    def run():
        try:
            box["result"] = function(*args)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            box["error"] = error
        box["done"].set()

    threading.Thread(target=run, daemon=True).start()
    return box


def stream_until_error_or_done(url: str, body: dict, first_piece: threading.Event) -> list:
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                first_piece.set()
    return events


def check_answers_correctly(url: str, reference, vectors) -> None:
    """A normal steered request answers exactly as generate_batch alone, and nothing is left processing."""
    body = {"prompt": "the cat sat on", **GREEDY, "steering": {"happy": 0.8}}
    response = post(url, body)
    assert response.status_code == 200, response.text
    expected = expected_result(reference, vectors, body["prompt"], body["steering"])
    assert response.json()["choices"][0]["text"] == expected.text
    assert response.json()["usage"]["completion_tokens"] == expected.completion_tokens
    wait_for(lambda: metrics(url)["ggsteer_requests_processing"] == 0, what="nothing processing")
    assert metrics(url)["ggsteer_requests_queued"] == 0


def raw_request(url: str, body: dict) -> socket.socket:
    """A request sent on a bare socket, so the test can hang up without reading the reply."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


# -- the scenarios (each test runs one; the last runs all of them on one server) -----------------


def disconnect_non_streaming(url: str, server) -> None:
    before = metrics(url)
    with patched_decodes(server.model, delay_s=0.005):
        sock = raw_request(url, {"prompt": "Write a long story", "temperature": 0, "max_tokens": 400})
        wait_for(lambda: metrics(url)["ggsteer_tokens_generated_total"] > before["ggsteer_tokens_generated_total"] + 3,
                 what="generation to start")
        sock.close()
        wait_for(lambda: metrics(url)["ggsteer_requests_processing"] == 0, what="the request to leave")
    after = metrics(url)
    assert (after['ggsteer_requests_total{outcome="cancelled"}']
            == before['ggsteer_requests_total{outcome="cancelled"}'] + 1)
    assert after['ggsteer_requests_total{outcome="completed"}'] == before['ggsteer_requests_total{outcome="completed"}']
    assert after["ggsteer_tokens_generated_total"] - before["ggsteer_tokens_generated_total"] < 300


def disconnect_streaming(url: str, server) -> None:
    before = metrics(url)
    with patched_decodes(server.model, delay_s=0.005):
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "Write a long story", "temperature": 0, "max_tokens": 400,
                                "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first piece
        wait_for(lambda: metrics(url)["ggsteer_requests_processing"] == 0, what="the stream to leave")
    after = metrics(url)
    assert (after['ggsteer_requests_total{outcome="cancelled"}']
            == before['ggsteer_requests_total{outcome="cancelled"}'] + 1)


def fill_the_queue(url: str, server, reference, vectors) -> None:
    """With max_queue 2: one request runs (its decode held up), two wait, a fourth gets 429."""
    worker = server.worker
    saved, worker.max_queue = worker.max_queue, 2
    prompts = ["the cat", "a dog sat", "you are"]
    gate = threading.Event()
    try:
        with patched_decodes(server.model, gate=gate):
            running = in_thread(post, url, {"prompt": prompts[0], **GREEDY})
            wait_for(lambda: metrics(url)["ggsteer_requests_processing"] == 1, what="the first to run")
            waiting = [in_thread(post, url, {"prompt": p, **GREEDY}) for p in prompts[1:]]
            wait_for(lambda: metrics(url)["ggsteer_requests_queued"] == 2, what="two waiting")
            refused = post(url, {"prompt": "one too many", **GREEDY})
            gate.set()
            for box in [running, *waiting]:
                assert box["done"].wait(60)
    finally:
        gate.set()
        worker.max_queue = saved
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert "--max-queue 2" in refused.json()["error"]["message"]
    for box, prompt in zip([running, *waiting], prompts):
        assert "result" in box, box.get("error")
        assert box["result"].status_code == 200
        assert box["result"].json()["choices"][0]["text"] == expected_result(reference, vectors, prompt).text
    assert metrics(url)['ggsteer_requests_rejected_total{reason="queue_full"}'] >= 1


def waiters_that_hang_up_free_the_queue(url: str, server, reference, vectors) -> None:
    """Clients waiting in a full queue hang up while the worker is stuck in a decode: their places are
    free at once, so a new request is queued, not refused."""
    worker = server.worker
    saved, worker.max_queue = worker.max_queue, 2
    gate = threading.Event()
    try:
        with patched_decodes(server.model, gate=gate):
            running = in_thread(post, url, {"prompt": "the cat", **GREEDY})
            wait_for(lambda: metrics(url)["ggsteer_requests_processing"] == 1, what="the first to run")
            waiters = [raw_request(url, {"prompt": p, **GREEDY}) for p in ("a dog", "you are")]
            wait_for(lambda: metrics(url)["ggsteer_requests_queued"] == 2, what="two waiting")
            for sock in waiters:
                sock.close()
            wait_for(lambda: metrics(url)["ggsteer_requests_queued"] == 0, what="the places to be freed")
            newcomer = in_thread(post, url, {"prompt": "hello there", **GREEDY})
            wait_for(lambda: metrics(url)["ggsteer_requests_queued"] == 1 or newcomer["done"].is_set(),
                     what="the newcomer")
            gate.set()
            assert running["done"].wait(60) and newcomer["done"].wait(60)
    finally:
        gate.set()
        worker.max_queue = saved
    assert newcomer["result"].status_code == 200, newcomer["result"].text
    assert newcomer["result"].json()["choices"][0]["text"] == expected_result(reference, vectors, "hello there").text
    assert running["result"].status_code == 200


def failing_decode(url: str, server, reference, vectors) -> None:
    """A request whose prompt breaks every decode fails alone: a non-streaming neighbour is retried and
    answers correctly; a stream that had sent text already cannot be retried and gets an error event."""
    long_body = {"prompt": "the cat sat on", "temperature": 0, "max_tokens": 60}
    stream_body = {"prompt": "you are very", "temperature": 0, "max_tokens": 60}
    with patched_decodes(server.model, delay_s=0.01, poison=True):
        neighbour = in_thread(post, url, long_body)
        first_piece = threading.Event()
        stream = in_thread(stream_until_error_or_done, url, stream_body, first_piece)
        assert first_piece.wait(30)
        wait_for(lambda: metrics(url)["ggsteer_requests_processing"] == 2, what="both to run")
        poisoned = post(url, {"prompt": f"the {POISON} cat", **GREEDY})
        assert neighbour["done"].wait(60) and stream["done"].wait(60)
    assert poisoned.status_code == 500
    assert "injected decode failure" in poisoned.json()["error"]["message"]
    expected = expected_result(reference, vectors, long_body["prompt"], max_tokens=60)
    assert neighbour["result"].status_code == 200, neighbour["result"].text
    assert neighbour["result"].json()["choices"][0]["text"] == expected.text
    assert neighbour["result"].json()["usage"]["completion_tokens"] == expected.completion_tokens
    events = stream["result"]
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert "injected decode failure" in events[-2]["error"]["message"]
    assert metrics(url)["ggsteer_requests_retried_total"] >= 2


def worker_loop_raises(url: str, server) -> None:
    """An exception outside batch.step() fails the job that was running, and the worker goes on."""
    worker = server.worker
    original = worker._drop_cancelled
    calls = []

    def broken(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected worker failure")
        return original(batch)

    worker._drop_cancelled = broken
    try:
        with patched_decodes(server.model, delay_s=0.005):
            response = post(url, {"prompt": "the cat", "temperature": 0, "max_tokens": 50}, timeout=30)
    finally:
        del worker._drop_cancelled
    assert response.status_code == 500
    assert "injected worker failure" in response.json()["error"]["message"]


class InjectedDeath(BaseException):
    """Not an Exception: nothing in the loop catches it, so the thread ends."""


def worker_thread_dies(url: str, server) -> None:
    worker = server.worker
    thread = worker._thread

    def die(batch):
        raise InjectedDeath()

    worker._drop_cancelled = die
    try:
        response = post(url, {"prompt": "the cat", **GREEDY}, timeout=30)
        thread.join(10)
    finally:
        del worker._drop_cancelled
    assert not thread.is_alive()
    assert response.status_code == 503
    assert "stopped" in response.json()["error"]["message"]
    wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, what="/health after the restart")
    assert worker._thread is not thread and worker._thread.is_alive()


def batch_cannot_open(url: str, server) -> None:
    """While no batch can be opened, requests and /health get 503 (with Retry-After); then it recovers."""
    worker = server.worker
    broken = threading.Event()
    broken.set()
    original = worker._open_batch

    def open_batch():
        if broken.is_set():
            raise RuntimeError("injected: no batch")
        return original()

    worker._open_batch = open_batch
    try:
        with patched_decodes(server.model, poison=True):
            post(url, {"prompt": f"a {POISON}", **GREEDY})  # fails alone; the fresh batch cannot open
        wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 503, what="/health 503")
        refused = post(url, {"prompt": "the cat", **GREEDY})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        broken.clear()
        wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, what="/health 200 again")
    finally:
        del worker._open_batch
    assert metrics(url)['ggsteer_requests_rejected_total{reason="unavailable"}'] >= 1


def recovery_fails(url: str, server) -> None:
    """Closing the failed batch raises too: the worker still opens a fresh one and serves."""
    worker = server.worker
    original = worker._open_batch

    def open_batch():
        batch = original()
        close = batch.close

        def failing_close():
            close()
            raise RuntimeError("injected: closing failed")

        batch.close = failing_close
        return batch

    thread = worker._thread
    worker._open_batch = open_batch
    try:
        with patched_decodes(server.model, poison=True):
            post(url, {"prompt": f"a {POISON}", **GREEDY})  # the next batch is one whose close raises
            response = post(url, {"prompt": f"a {POISON}", **GREEDY})
        wait_for(lambda: worker.available, what="a fresh batch")
    finally:
        del worker._open_batch
    assert response.status_code == 500 and "injected decode failure" in response.json()["error"]["message"]
    assert worker._thread is thread and thread.is_alive()  # recovered in place, not by a restarted thread


# -- the tests ----------------------------------------------------------------------------------


def test_a_non_streaming_request_is_cancelled_when_its_client_disconnects(served):
    url, server = served
    disconnect_non_streaming(url, server)


def test_a_full_queue_answers_429_with_retry_after(served, reference, vectors):
    fill_the_queue(*served, reference, vectors)


def test_waiters_that_hang_up_free_their_places_at_once(served, reference, vectors):
    waiters_that_hang_up_free_the_queue(*served, reference, vectors)


def test_a_failing_decode_takes_no_retryable_request_with_it(served, reference, vectors):
    url, server = served
    failing_decode(url, server, reference, vectors)
    check_answers_correctly(url, reference, vectors)


def test_the_worker_survives_an_error_outside_the_decode(served, reference, vectors):
    url, server = served
    worker_loop_raises(url, server)
    check_answers_correctly(url, reference, vectors)


def test_a_dead_worker_thread_is_started_again(served, reference, vectors):
    url, server = served
    worker_thread_dies(url, server)
    check_answers_correctly(url, reference, vectors)


def test_the_worker_survives_a_failure_while_recovering(served, reference, vectors):
    url, server = served
    recovery_fails(url, server)
    check_answers_correctly(url, reference, vectors)


def test_503_while_no_batch_can_be_opened(served, reference, vectors):
    url, server = served
    batch_cannot_open(url, server)
    check_answers_correctly(url, reference, vectors)


def test_every_fault_in_turn_then_a_correct_answer(served, reference, vectors):
    url, server = served
    disconnect_non_streaming(url, server)
    disconnect_streaming(url, server)
    fill_the_queue(url, server, reference, vectors)
    waiters_that_hang_up_free_the_queue(url, server, reference, vectors)
    failing_decode(url, server, reference, vectors)
    worker_loop_raises(url, server)
    worker_thread_dies(url, server)
    recovery_fails(url, server)
    batch_cannot_open(url, server)
    check_answers_correctly(url, reference, vectors)
    final = metrics(url)
    assert final["ggsteer_requests_processing"] == 0 and final["ggsteer_requests_queued"] == 0
    assert final["ggsteer_up"] == 1
