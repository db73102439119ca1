"""`ggsteer serve --rpc` outlives a lost RPC worker: two real `ggsteer rpc-server` processes on
loopback hold the tiny model's layers; killing one during requests fails them with 503 (or an error
event) naming it, the port keeps answering 503 while it is down, and once it is restarted the next
request gets exactly the text it got before."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from support.rpc import CLI, start_workers, stop
from support.server import expected_text, write_vectors

from ggsteer import SteeredModel
from ggsteer.runtime.rpc import EXIT_WORKER_LOST, free_port, library_path, start_local_worker
from ggsteer.serve.supervisor import accept_and_answer

pytestmark = pytest.mark.skipif(library_path("libggml-rpc") is None,
                                reason="llama-cpp-python was built without -DGGML_RPC=ON")

CTX = 1024
SERVE = ["--threads", "1", "--max-batch", "2", "--ctx-size", str(CTX), "--batch-wait-ms", "0"]
PROMPT = "the dog is"
STEERED = {"prompt": PROMPT, "temperature": 0, "max_tokens": 12, "steering": {"happy": 0.5}}
LONG = {**STEERED, "max_tokens": 900}  # about two seconds of decoding: still running when the worker dies
START_S = 120  # a server process loading the model on a loaded machine
QUICK_S = 10  # a reply that must not wait for anything


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if result := condition():
                return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextlib.contextmanager
def rpc_server(model_path, vector_dir, endpoints, log_path):
    """`ggsteer serve --rpc` as a process on a free port; yields (base URL, process), stops it on exit."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(CLI + ["serve", "-m", str(model_path), "--vectors", str(vector_dir), "--port",
                                          str(port), "--rpc", ",".join(endpoints), *SERVE], stderr=log)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop(process)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def stream(client: httpx.Client, url: str, body: dict, on_first_piece=None) -> list:
    """The events of a streaming request; `on_first_piece()` runs when the first text arrives."""
    events = []
    with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if on_first_piece is not None and len(events) == 1:
                    on_first_piece()
    return events


def assert_names_lost_worker(message: str, endpoint: str) -> None:
    assert f"RPC worker {endpoint} stopped answering" in message, message


def test_served_model_survives_a_lost_worker(tiny_model_path, tmp_path):
    vectors = write_vectors(tmp_path / "vectors")
    local = SteeredModel(tiny_model_path, n_ctx=CTX, n_seq_max=2, n_threads=1, n_threads_batch=1)
    try:
        expected = expected_text(local, vectors, PROMPT, STEERED["steering"])
    finally:
        local.close()
    ports, workers = start_workers()
    endpoints = [f"127.0.0.1:{port}" for port in ports]
    log_path = tmp_path / "serve.log"
    try:
        with rpc_server(tiny_model_path, tmp_path / "vectors", endpoints, log_path) as (url, server), \
                httpx.Client(timeout=QUICK_S * 3) as client:
            wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, START_S, "the server")
            # (a) a steered greedy request: the local model's text
            assert text_of(client.post(f"{url}/v1/completions", json=STEERED)) == expected

            # (e) control: with every worker up, a long stream ends normally, without an error event
            events = stream(client, url, LONG)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            assert not any("error" in event for event in events[:-1])

            # (b) a worker killed during a stream and a non-streaming request generating beside it
            beside = {}
            thread = threading.Thread(target=lambda: beside.update(
                response=httpx.post(f"{url}/v1/completions", json=LONG, timeout=QUICK_S * 6)))
            killed = {}

            def kill_worker() -> None:
                thread.start()
                time.sleep(0.2)  # the other request joins the batch
                workers[1].kill()
                killed["at"] = time.monotonic()

            events = stream(client, url, LONG, on_first_piece=kill_worker)
            ended_after = time.monotonic() - killed["at"]
            thread.join(timeout=QUICK_S * 6)
            print(f"the stream ended {ended_after:.3f} s after the kill")
            assert ended_after < QUICK_S
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503
            assert_names_lost_worker(events[-2]["error"]["message"], endpoints[1])
            response = beside["response"]
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert_names_lost_worker(response.json()["error"]["message"], endpoints[1])

            # (c) while it is down: the supervisor answers every request at once with 503 naming it
            health = wait_for(lambda: (r := httpx.get(f"{url}/health", timeout=QUICK_S)).json().get("status")
                              == "unavailable" and r, QUICK_S, "the supervisor's 503")
            assert health.status_code == 503
            assert_names_lost_worker(health.json()["error"]["message"], endpoints[1])
            for _ in range(3):
                started = time.monotonic()
                response = httpx.post(f"{url}/v1/completions", json=STEERED, timeout=QUICK_S)
                assert time.monotonic() - started < 2
                assert response.status_code == 503 and response.headers["retry-after"] == "1"
                error = response.json()["error"]
                assert error["type"] == "server_error" and error["code"] == 503
                assert_names_lost_worker(error["message"], endpoints[1])

            # (d) the worker back on its port: within seconds, the same text as before
            stop(workers[1])
            workers[1] = start_local_worker(ports[1])
            restarted = time.monotonic()
            text = wait_for(lambda: (r := httpx.post(f"{url}/v1/completions", json=STEERED, timeout=QUICK_S))
                            .status_code == 200 and text_of(r), START_S, "a 200 after the restart")
            print(f"served again {time.monotonic() - restarted:.2f} s after the worker restarted")
            assert text == expected
            assert server.poll() is None

            # Ctrl-C's sibling, SIGTERM: the supervisor and its server stop, the port is closed
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == -signal.SIGTERM
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 2):
                pass
        # (e) the path taken: ggsteer's handler of ggml-rpc's failure, then the supervisor's restart
        log = log_path.read_text()
        assert f"ggsteer: error: RPC worker {endpoints[1]} stopped answering" in log
        assert "the server ends this process (status 75)" in log
        assert "answering 503 until every worker answers again" in log
        assert "every RPC worker answers: starting the server again" in log
        assert "Traceback" not in log
    finally:
        for worker in workers:
            stop(worker)


def test_first_start_with_a_worker_down_fails_at_once(tiny_model_path, tmp_path):
    """No restart loop when the server never served: the server's own error and status."""
    write_vectors(tmp_path / "vectors")
    endpoint = f"127.0.0.1:{free_port()}"
    result = subprocess.run(CLI + ["serve", "-m", str(tiny_model_path), "--vectors", str(tmp_path / "vectors"),
                                   "--port", str(free_port()), "--rpc", endpoint, *SERVE],
                            check=False, capture_output=True, text=True, timeout=START_S)
    assert result.returncode == 2
    assert f"ggsteer: error: RPC worker {endpoint}: cannot connect" in result.stderr


def test_supervisor_answers_503_in_openai_shape():
    """The responder alone (no model, no RPC): a JSON body is read, the reply is a 503 with Retry-After."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100_000}]}),
                           ("/health", None)):
            thread = threading.Thread(target=accept_and_answer, args=(listener, "RPC worker h:1 stopped answering"))
            thread.start()
            response = httpx.request("GET" if body is None else "POST", url + path, json=body, timeout=QUICK_S)
            thread.join(timeout=QUICK_S)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            error = {"message": "RPC worker h:1 stopped answering", "type": "server_error", "param": None,
                     "code": 503}
            assert response.json() == ({"status": "unavailable", "error": error} if body is None else {"error": error})


FAKE_SERVER = """
import os, sys, time
from ggsteer.serve.supervisor import ChildChannel
channel = ChildChannel.from_environment()
first_status, later_status = (int(x) for x in channel.read_payload().decode().split(","))
if not channel.restart:
    channel.ready()
    os.write(channel.status_fd, b"RPC worker h:1 stopped answering (test)\\n")  # as the C handler does
    sys.exit(first_status)
time.sleep(3)  # loading the model again
sys.exit(later_status)
"""


@pytest.mark.parametrize(("first", "later", "restarts"), [(75, 3, True), (4, 0, False)])
def test_supervisor_restarts_after_status_75_only(first, later, restarts, capfd):
    """The supervisor's states without a model: status 75 after serving -> 503 naming the lost worker,
    then a fresh server once every worker answers (none to probe here); any other status ends it."""
    from ggsteer.serve.supervisor import Supervisor

    replies = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/completions"
        done = threading.Event()

        def ask() -> None:
            while not done.is_set():
                with contextlib.suppress(httpx.TransportError):
                    replies.append(httpx.post(url, json={"prompt": "x"}, timeout=QUICK_S))
                time.sleep(0.05)

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            status = Supervisor(listener, [], FAKE_SERVER, f"{first},{later}".encode()).run()
        finally:
            done.set()
            asker.join(timeout=QUICK_S * 2)
    assert status == (later if restarts else first)
    messages = [reply.json()["error"]["message"] for reply in replies]
    assert all(reply.status_code == 503 for reply in replies)
    if restarts:
        assert any(m.startswith("the server is loading the model again after this: RPC worker h:1 stopped "
                                "answering (test)") for m in messages), messages
        assert "answering 503 until every worker answers again" in capfd.readouterr().err
    else:
        assert messages == []  # it never answered: the first server's status ends it


HEARS_BUT_STAYS = """
import sys, time
from ggsteer import SteeredModel
from ggsteer.runtime.rpc import on_lost_worker
model = SteeredModel(sys.argv[1], rpc_servers=[sys.argv[2]], n_ctx=256, n_batch=128, n_threads=1)
on_lost_worker(lambda line: print("heard:", line, time.monotonic(), flush=True), grace_s=1.0)
print("loaded", flush=True)
while True:
    model.create_completion("the dog is", max_tokens=200, temperature=0)
"""


def test_lost_worker_ends_the_process_even_if_python_does_not(tiny_model_path):
    """on_lost_worker's callback hears the lost worker; if nothing ends the process, the parked ggml
    thread does after grace_s, with status 75: a server stuck in Python cannot hang."""
    ports, workers = start_workers(1)
    try:
        command = [sys.executable, "-c", HEARS_BUT_STAYS, str(tiny_model_path), f"127.0.0.1:{ports[0]}"]
        client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "loaded"
        time.sleep(0.3)  # generating now
        stop(workers[0])
        output, error = client.communicate(timeout=QUICK_S * 3)
        assert client.returncode == EXIT_WORKER_LOST, error
        heard = [line for line in output.splitlines() if line.startswith("heard:")]
        assert len(heard) == 1 and f"RPC worker 127.0.0.1:{ports[0]} stopped answering" in heard[0]
        assert "the server ends this process (status 75)" in error
    finally:
        for worker in workers:
            stop(worker)
