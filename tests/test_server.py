"""`ggsteer serve`: the real server (uvicorn on a free loopback port) with the tiny reference model.

Every generated text is compared with `SteeredModel.generate_batch` for the same prompt and
controls, alone, at temperature 0, on a second model instance with the same settings.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.server import (
    GREEDY,
    JSON,
    MAX_BATCH,
    TOKENS,
    RecordingJob,
    expected_result,
    expected_text,
    fresh_server,
    make_vector,
    running_server,
    stream_events,
    tiny_server_model,
    transcript,
    wait_until,
    write_vectors,
)

from ggsteer.chat_format import chat_prompt
from ggsteer.serve import ServerConfig, VectorRegistry, create_app
from ggsteer.serve.settings import MAX_BODY_BYTES
from ggsteer.serve.worker import BatchWorker
from ggsteer.vectors import ControlVector


@pytest.fixture(scope="module")
def vector_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vectors")


@pytest.fixture(scope="module")
def vectors(vector_dir) -> dict[str, ControlVector]:
    return write_vectors(vector_dir)


@pytest.fixture(scope="module")
def server_model(tiny_model_path):
    with tiny_server_model(tiny_model_path) as model:
        yield model


@pytest.fixture(scope="module")
def app(server_model, vector_dir, vectors):
    registry = VectorRegistry.load(vector_dir, server_model)
    return create_app(server_model, registry, ServerConfig(max_batch=MAX_BATCH))


@pytest.fixture(scope="module")
def base_url(app):
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


# -- completions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steering", [None, {"happy": 0.8}, {"happy": -1.5, "honest": 0.7}, {"plain": 1.2}])
def test_completion_equals_generate_batch(client, reference, vectors, steering):
    body = {"prompt": "the cat sat on", **GREEDY}
    if steering is not None:
        body["steering"] = steering
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "text_completion"
    expected = expected_result(reference, vectors, "the cat sat on", steering)
    assert result["choices"][0]["text"] == expected.text
    assert result["choices"][0]["finish_reason"] == expected.finish_reason
    assert result["usage"] == {"prompt_tokens": len(reference.tokenize_prompt("the cat sat on")),
                               "completion_tokens": expected.completion_tokens,
                               "total_tokens": expected.prompt_tokens + expected.completion_tokens}


def test_steering_changes_the_text(client):
    texts = {client.post("/v1/completions",
                         json={"prompt": "hello", **GREEDY, "steering": s}).json()["choices"][0]["text"]
             for s in ({}, {"happy": 2.0}, {"happy": -2.0})}
    assert len(texts) == 3


def test_raw_vector_strength_is_a_plain_coefficient(client, reference, vectors):
    # "plain" has no trained gap: strength 0.6 must mean 0.6 x its stored directions
    plain = vectors["plain"]
    assert plain.unit == "raw"
    scaled = ControlVector({il: 0.6 * d for il, d in plain.directions.items()}, "llama", {"unit": "gap"})
    expected = reference.generate_batch(["a dog"], [[(scaled, 1.0)]], TOKENS, temperature=0.0)[0]
    steered = client.post("/v1/completions", json={"prompt": "a dog", **GREEDY, "steering": {"plain": 0.6}}).json()
    assert steered["choices"][0]["text"] == expected
    assert expected != expected_text(reference, vectors, "a dog")


def test_seeded_sampling_is_reproducible_under_concurrency(base_url, reference, vectors):
    # each request samples with exactly its own seed, whichever batch and position it lands in
    body = {"prompt": "the cat", "max_tokens": TOKENS, "temperature": 0.9, "seed": 7, "steering": {"happy": 0.5}}
    expected = reference.generate_batch(["the cat"], [[(vectors["happy"], 0.5)]], TOKENS, temperature=0.9, seed=7)[0]

    def post(_):
        with httpx.Client(base_url=base_url, timeout=60) as c:
            return c.post("/v1/completions", json=body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(post, range(3))) == [expected] * 3


def test_stop_strings_are_cut(client, reference, vectors):
    full = expected_text(reference, vectors, "the dog")
    stop = full.strip()[2:5] or full[1:3]
    response = client.post("/v1/completions", json={"prompt": "the dog", **GREEDY, "stop": [stop]})
    text = response.json()["choices"][0]["text"]
    assert text == expected_text(reference, vectors, "the dog", stop=[stop])
    assert stop not in text
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    assert response.json()["usage"]["completion_tokens"] < TOKENS


def test_streamed_completion_concatenates_to_the_full_text(client):
    body = {"prompt": "you are very", **GREEDY, "steering": {"honest": -0.9}}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    events = stream_events(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len(chunks) > 2  # streamed in pieces, not as one block


def test_streaming_holds_back_a_stop_string(client, reference, vectors):
    full = expected_text(reference, vectors, "the dog")
    stop = full.strip()[2:5] or full[1:3]
    body = {"prompt": "the dog", **GREEDY, "stop": [stop]}
    events = stream_events(client, "/v1/completions", body)
    streamed = "".join(c["choices"][0]["text"] for c in events[:-1])
    assert streamed == client.post("/v1/completions", json=body).json()["choices"][0]["text"]


# -- chat -----------------------------------------------------------------------------------------


def test_chat_uses_the_transcript_for_base_models(client, reference, vectors):
    body = {"messages": [{"role": "user", "content": "hello there"}], **GREEDY, "steering": {"happy": 1.0}}
    result = client.post("/v1/chat/completions", json=body).json()
    assert result["object"] == "chat.completion"
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant"
    expected = expected_text(reference, vectors, transcript("hello there"), {"happy": 1.0}, stop=["\nUser:", "\n\n\n"])
    assert message["content"] == expected.lstrip()


def test_streamed_chat_concatenates_to_the_full_reply(client):
    body = {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "you"}],
            **GREEDY, "steering": {"happy": -0.4, "honest": 0.3}}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    events = stream_events(client, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_template_is_used_when_the_model_has_one():
    class TemplatedModel:  # the parts of SteeredModel that chat_prompt reads
        metadata = {"tokenizer.chat_template":
                    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}"
                    "{% endfor %}<|assistant|>"}

        def token_bos(self):
            return 1

        def token_eos(self):
            return 2

        def detokenize(self, tokens, special=False):  # noqa: ARG002 - chat_prompt passes special= by keyword
            return {1: b"<s>", 2: b"</s>"}[tokens[0]]

        def tokenize(self, text, add_bos=True, special=False):  # noqa: ARG002 - keyword of the real one
            return ([1] if add_bos and self.vocabulary_adds_bos else []) + list(text)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    model = TemplatedModel()
    model.vocabulary_adds_bos = True
    prompt = chat_prompt(model, messages)
    assert prompt.text == "<|system|>Be brief.</s><|user|>Hi</s><|assistant|>"  # BOS left to the tokenizer
    assert prompt.stops == ("</s>",)
    assert not prompt.strip_leading
    model.vocabulary_adds_bos = False  # a tokenizer that adds none (SmolLM2): the template's BOS stays
    assert chat_prompt(model, messages).text == "<s><|system|>Be brief.</s><|user|>Hi</s><|assistant|>"


# -- vectors --------------------------------------------------------------------------------------


def test_vectors_lists_the_registry_with_metadata(client):
    result = client.get("/v1/vectors").json()
    by_name = {v["id"]: v for v in result["data"]}
    assert set(by_name) == {"happy", "honest", "plain"}
    happy = by_name["happy"]
    assert happy["layers"] == [1, 2]
    assert happy["method"] == "mean_diff"
    assert happy["model_hint"] == "llama"
    assert happy["recommended_strength"] == 0.5
    assert happy["unit"] == "gap"
    assert by_name["honest"]["recommended_strength"] is None
    assert by_name["plain"]["unit"] == "raw"


def test_vectors_that_do_not_fit_the_model_are_refused_at_start_up(tmp_path, server_model):
    write_vectors(tmp_path / "ok")
    make_vector(32, 1).save(tmp_path / "ok" / "small.gguf")
    with pytest.raises(ValueError, match=r"small\.gguf.*n_embd 32"):
        VectorRegistry.load(tmp_path / "ok", server_model)


def test_serve_command_reports_a_bad_registry(tmp_path, tiny_model_path, capsys):
    from ggsteer.cli import main

    make_vector(32, 1).save(tmp_path / "wrong.gguf")
    assert main(["serve", "--model", str(tiny_model_path), "--vectors", str(tmp_path), "--threads", "2"]) == 2
    error = capsys.readouterr().err
    assert "wrong.gguf" in error and "n_embd 32" in error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_serves(tmp_path, tiny_model_path):
    """`ggsteer serve` itself, in a subprocess, answers on the port it was given and stops on SIGTERM."""
    write_vectors(tmp_path)
    port = free_port()
    command = [sys.executable, "-c", "import sys; from ggsteer.cli import main; sys.exit(main())", "serve",
               "--model", str(tiny_model_path), "--vectors", str(tmp_path), "--port", str(port), "--threads", "2",
               "--ctx-size", "256", "--max-batch", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "ggsteer serve did not start listening"
            with contextlib.suppress(httpx.TransportError):
                listed = httpx.get(f"{url}/v1/vectors", timeout=5)
                break
            time.sleep(0.2)
        assert [v["id"] for v in listed.json()["data"]] == ["happy", "honest", "plain"]
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", **GREEDY, "steering": {"happy": 1}},
                              timeout=60)
        assert response.status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving ggsteer-tiny-llama with vectors happy, honest, plain" in output


# -- bad requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "steering": {"sad": 0.5}}, r"unknown vector 'sad'.*happy, honest, plain"),
        ({"prompt": "x", "steering": {"happy": 10.5}}, r"within \+-10"),
        ({"prompt": "x", "steering": {"happy": "lots"}}, "finite number"),
        ({"prompt": "x", "steering": ["happy"]}, "steering"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"steering": {}}, "prompt"),
        ({"prompt": "x" * 3000, "max_tokens": 100}, "exceeds the context"),
    ],
)
def test_bad_completion_requests_get_400(client, body, message):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]["message"])


def test_non_finite_strengths_get_400(client):
    for literal in ("NaN", "Infinity", "-Infinity"):
        response = client.post("/v1/completions", content=f'{{"prompt": "x", "steering": {{"happy": {literal}}}}}',
                               headers=JSON)
        assert response.status_code == 400
        assert "finite" in response.json()["error"]["message"]


def test_bad_json_gets_400(client):
    for content in (b'{"prompt": ', b"[1, 2]", b"\xff\xfe"):
        response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content


def test_bad_chat_messages_get_400(client):
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert client.post("/v1/chat/completions",
                       json={"messages": [{"role": "wizard", "content": "x"}]}).status_code == 400


def test_large_bodies_get_413(client):
    big = {"prompt": "x" * (MAX_BODY_BYTES + 10)}
    assert client.post("/v1/completions", json=big).status_code == 413

    def chunks():  # no content-length: the limit is checked while reading
        for _ in range(20):
            yield b" " * 100_000

    assert client.post("/v1/completions", content=chunks(), headers=JSON).status_code == 413


def test_server_keeps_serving_after_errors(client):
    client.post("/v1/completions", content=b"nonsense")
    client.post("/v1/completions", json={"prompt": "x", "steering": {"nope": 1}})
    response = client.post("/v1/completions", json={"prompt": "still here", **GREEDY})
    assert response.status_code == 200


# -- API key --------------------------------------------------------------------------------------


def test_api_key_is_enforced(tiny_model_path, vector_dir, vectors):
    with fresh_server(tiny_model_path, vector_dir, ServerConfig(api_key="s3cret", max_batch=4)) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"prompt": "hi", **GREEDY}
            assert c.post("/v1/completions", json=body).status_code == 401
            assert c.get("/v1/vectors").status_code == 401
            wrong = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert wrong.headers["www-authenticate"] == "Bearer"
            good = {"Authorization": "Bearer s3cret"}
            assert c.post("/v1/completions", json=body, headers=good).status_code == 200
            assert c.get("/v1/vectors", headers=good).status_code == 200
            assert c.get("/").status_code == 200  # the page itself is public; it sends the key it is given


# -- isolation under load -------------------------------------------------------------------------

CLIENTS = 8
REQUESTS_PER_CLIENT = 5


def client_request(i: int, k: int) -> dict:
    """Client i's k-th request: its own steering (some unsteered), prompt, length and endpoint."""
    steering = [{}, {"happy": 1.5}, {"happy": -1.5}, {"honest": 1.0}, {"honest": -2.0, "happy": 0.5},
                {"plain": 0.8}, {"plain": -0.8, "honest": 0.4}, {"happy": 3.0}][i]
    prompt = ["the cat", "a dog sat", "you", "hello there"][(i + k) % 4]
    stream = k % 3 == 2  # every third request streams: its pieces travel through on_token under load
    # lengths differ between clients: requests with different settings share batches
    sampling = {"temperature": 0, "max_tokens": (TOKENS, 9, 5)[i % 3]}
    if k % 2:
        body = {"messages": [{"role": "user", "content": prompt}], **sampling, "steering": steering, "stream": stream}
        return {"path": "/v1/chat/completions", "body": body}
    return {"path": "/v1/completions", "body": {"prompt": prompt, **sampling, "steering": steering, "stream": stream}}


def alone(reference, vectors, request):
    """What the request gives alone: its visible text, finish reason and completion tokens."""
    body = request["body"]
    if "prompt" in body:
        result = expected_result(reference, vectors, body["prompt"], body["steering"], max_tokens=body["max_tokens"])
        return result.text, result.finish_reason, result.completion_tokens
    prompt = transcript(body["messages"][0]["content"])
    result = expected_result(reference, vectors, prompt, body["steering"], ["\nUser:", "\n\n\n"], body["max_tokens"])
    return result.text.lstrip(), result.finish_reason, result.completion_tokens


def response_text(result) -> str:
    if isinstance(result, list):  # streamed chunks, then "[DONE]"
        assert result[-1] == "[DONE]"
        return "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content", "")
                       for c in result[:-1])
    choice = result["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def send(c: httpx.Client, request: dict) -> tuple[int, object]:
    if request["body"]["stream"]:
        return 200, stream_events(c, request["path"], request["body"])
    response = c.post(request["path"], json=request["body"])
    return response.status_code, response.json()


def test_concurrent_clients_never_see_each_others_steering(base_url, app, reference, vectors):
    requests = {(i, k): client_request(i, k) for i in range(CLIENTS) for k in range(REQUESTS_PER_CLIENT)}
    expected = {key: alone(reference, vectors, request) for key, request in requests.items()}
    batches_before = len(app.state.server.worker.batch_sizes)

    def run_client(i: int) -> list:
        results = []
        with httpx.Client(base_url=base_url, timeout=60) as c:
            for k in range(REQUESTS_PER_CLIENT):
                results.append(((i, k), *send(c, requests[(i, k)])))
        return results

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for batch in pool.map(run_client, range(CLIENTS)) for r in batch]

    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    for key, status, result in results:
        assert status == 200, (key, result)
        text, finish_reason, completion_tokens = expected[key]
        assert response_text(result) == text, key
        if isinstance(result, dict):
            assert (result["choices"][0]["finish_reason"], result["usage"]["completion_tokens"]) == (
                finish_reason, completion_tokens)
    sizes = app.state.server.worker.batch_sizes[batches_before:]
    assert max(sizes) > 1, f"requests were never batched together: {sizes}"


# -- continuous batching: the worker on its own model ----------------------------------------------


@pytest.fixture
def worker(tiny_model_path):
    with tiny_server_model(tiny_model_path) as model:
        worker = BatchWorker(model, max_batch=4)
        worker.start()
        yield worker
        worker.stop()


def test_a_request_joins_a_running_generation(worker, reference, vectors):
    model = worker.model
    long = RecordingJob(model.tokenize_prompt("the cat sat on"), 300, delay_s=0.002)
    worker.submit(long)
    wait_until(lambda: long.pieces)
    short = RecordingJob(model.tokenize_prompt("a dog"), TOKENS, controls=[model.intervention(vectors["happy"], 1.0)])
    worker.submit(short)
    assert short.finished.wait(60) and long.finished.wait(60)
    # the short request joined the long one's decodes and left long before it ended
    assert short.finished_at < long.finished_at
    assert max(worker.batch_sizes) == 2
    assert short.result.text == expected_text(reference, vectors, "a dog", {"happy": 1.0})
    assert long.result.text == expected_text(reference, vectors, "the cat sat on", max_tokens=300)
    assert (long.result.finish_reason, long.result.completion_tokens) == ("length", 300)


def test_an_abandoned_request_leaves_the_batch(worker, reference, vectors):
    model = worker.model
    gone = RecordingJob(model.tokenize_prompt("the cat sat on"), 300, delay_s=0.002)
    kept = RecordingJob(model.tokenize_prompt("you are"), 200, delay_s=0.002)
    worker.submit(gone)
    worker.submit(kept)
    wait_until(lambda: len(gone.pieces) >= 2)
    gone.cancelled = True  # what the server does when a streaming client goes away
    assert kept.finished.wait(60)
    assert gone.result is None and gone.error is None and len(gone.pieces) < 300
    assert kept.result.text == expected_text(reference, vectors, "you are", max_tokens=200)
    assert worker.batch_sizes[-1] == 1


def test_stopping_the_worker_fails_what_runs(tiny_model_path):
    with tiny_server_model(tiny_model_path) as model:
        worker = BatchWorker(model, max_batch=4)
        worker.start()
        job = RecordingJob(model.tokenize_prompt("the cat"), 400, delay_s=0.002)
        worker.submit(job)
        wait_until(lambda: job.pieces)
        worker.stop()
    assert job.error == "the server is shutting down" and job.result is None
