"""No request can hurt another (issue 24): poisonous requests get their own 4xx (or their own 5xx
when they slip through to the worker), and clients streaming meanwhile get exactly their solo text.

The tiny F32 model is batch-invariant, so a stream's text must equal the same request through
generate_batch alone whatever its neighbours do. Faults that validation cannot stop are injected
into the model: logits rows overwritten with NaN for one sequence, a hook program that cannot be
built for one sequence.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import httpx
import llama_cpp
import numpy as np
import pytest
from support.server import expected_result, fresh_server, tiny_server_model, write_vectors

import ggsteer.generation
from ggsteer.generation import ContinuousBatch, SequenceSampling
from ggsteer.serve import ServerConfig
from ggsteer.serve.worker import BatchWorker
from ggsteer.steering.interventions import normalize_controls
from ggsteer.vectors import ControlVector

NAN_MARKER = "~"  # a prompt holding this character gets NaN logits (nan_logits_for)
STREAM_TOKENS = 100
SLOW_DECODE_S = 0.25  # while the poisonous requests are sent, so the streams outlast them
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def vectors(vectors_and_dir):
    return vectors_and_dir[0]


@pytest.fixture(scope="module")
def served(tiny_model_path, vectors_and_dir):
    with fresh_server(tiny_model_path, vectors_and_dir[1], ServerConfig(max_batch=4)) as (url, app):
        yield url, app.state.server


# -- injected faults ------------------------------------------------------------------------------


@contextlib.contextmanager
def nan_logits_for(model, slow: threading.Event | None = None):
    """Every decode sleeps SLOW_DECODE_S while `slow` is set; the logits rows of a sequence whose prompt rows in
    that decode hold NAN_MARKER's token are overwritten with NaN after llama.cpp computed them."""
    original = model.decode_batch
    marker = model.tokenize(NAN_MARKER.encode(), add_bos=False, special=False)[0]

    def decode(batch, generated=False):
        if slow is not None and slow.is_set():
            time.sleep(SLOW_DECODE_S)
        result = original(batch, generated)
        rows = range(batch.n_tokens)
        poisoned = {batch.seq_id[i][0] for i in rows if batch.token[i] == marker and not generated[i]}
        for i in rows:
            if batch.logits[i] and batch.seq_id[i][0] in poisoned:
                row = llama_cpp.llama_get_logits_ith(model.ctx, i)
                np.ctypeslib.as_array(row, shape=(model.n_vocab(),))[:] = np.nan
        return result

    model.decode_batch = decode
    try:
        yield
    finally:
        del model.decode_batch


@contextlib.contextmanager
def unbuildable_program_for(poisoned_strength: float):
    """Hook programs holding an intervention at exactly this strength cannot be built (OverflowError)."""
    original = ggsteer.generation.compile_program

    def compile_program(per_slot, *args, **kwargs):
        if any(item.strength == poisoned_strength for items in per_slot for item in items):
            raise OverflowError("injected: this steering cannot be laid out for the hook")
        return original(per_slot, *args, **kwargs)

    ggsteer.generation.compile_program = compile_program
    try:
        yield
    finally:
        ggsteer.generation.compile_program = original


# -- containment inside one batch ----------------------------------------------------------------


def tokens(model, prompt: str) -> list[int]:
    return model.tokenize_prompt(prompt)


def test_nan_logits_end_only_their_own_sequence(tiny_model_path, reference, vectors):
    prompts = ["the cat", "a dog ~ sat", "hello there"]
    with tiny_server_model(tiny_model_path) as model, nan_logits_for(model), ContinuousBatch(model) as batch:
        happy = normalize_controls(model, [(vectors["happy"], 0.8)])
        states = [batch.add(tokens(model, p), c, SequenceSampling(12)) for p, c in zip(prompts, [[], [], happy])]
        while batch.active:
            batch.step()
    assert states[1].finish_reason == "error" and "NaN or Inf" in states[1].error
    assert states[1].generated == []
    assert states[0].text == expected_result(reference, vectors, prompts[0]).text
    assert states[2].text == expected_result(reference, vectors, prompts[2], {"happy": 0.8}).text
    assert states[0].error is None and states[2].error is None


def test_generate_batch_names_the_prompt_that_failed(tiny_model_path):
    with tiny_server_model(tiny_model_path) as model, nan_logits_for(model):
        with pytest.raises(RuntimeError, match=r"prompt 1: .*NaN or Inf"):
            model.generate_batch(["the cat", "a ~ dog"], max_tokens=4, temperature=0.0)


def test_steering_that_cannot_be_built_fails_its_request_alone(tiny_model_path, reference, vectors):
    """The worker: one job's hook program cannot be built; it fails, its neighbours finish exactly."""
    from support.server import RecordingJob, wait_until

    with tiny_server_model(tiny_model_path) as model, unbuildable_program_for(0.123):
        worker = BatchWorker(model, max_batch=4)
        worker.start()
        try:
            def steer(strength):
                return normalize_controls(model, [(vectors["happy"], strength)])

            jobs = [RecordingJob(tokens(model, "the cat"), 12, delay_s=0.01),
                    RecordingJob(tokens(model, "a dog sat"), 12, controls=steer(0.123)),
                    RecordingJob(tokens(model, "hello there"), 12, controls=steer(0.8))]
            for job in jobs:
                worker.submit(job)
            wait_until(lambda: all(job.finished.is_set() for job in jobs))
        finally:
            worker.stop()
    assert jobs[1].result is None and "injected" in jobs[1].error and jobs[1].error_status == 500
    assert jobs[0].error is None and jobs[0].result.text == expected_result(reference, vectors, "the cat").text
    assert jobs[2].result.text == expected_result(reference, vectors, "hello there", {"happy": 0.8}).text
    assert worker.metrics.snapshot()[0].get("ggsteer_worker_restarts_total", 0) == 0


# -- poisonous requests --------------------------------------------------------------------------


def huge_vector_bytes(tmp_path) -> bytes:
    path = tmp_path / "huge.gguf"
    ControlVector({il: np.full(48, 1e30, np.float32) for il in (1, 2)}, "llama", {"unit": "raw"}).save(path)
    return path.read_bytes()


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: a lone surrogate travels as the escape "\ud800"


def nested(depth: int) -> bytes:
    return b'{"prompt": "x", "max_tokens": 2, "metadata": ' + b"[" * depth + b"]" * depth + b"}"


SMALL = {"max_tokens": 4, "temperature": 0}
# (name, method, path, body bytes or callable(tmp_path) -> bytes, extra headers, expected status)
POISON = [
    ("first_k 1e300", "POST", "/v1/completions",
     json_bytes({"prompt": "x", **SMALL, "steering": {"happy": {"strength": 0.5, "first_k": 1e300}}}), {}, 400),
    ("first_k 10**30", "POST", "/v1/completions",
     json_bytes({"prompt": "x", **SMALL, "steering": {"happy": {"strength": 0.5, "first_k": 10**30}}}), {}, 400),
    ("layers 1-20000000", "POST", "/v1/completions",
     json_bytes({"prompt": "x", **SMALL, "steering": {"happy": {"strength": 0.5, "layers": "1-20000000"}}}), {}, 400),
    ("default layers 1-20000000", "POST", "/v1/steering",
     json_bytes({"steering": {"happy": {"strength": 0.5, "layers": "1-20000000"}}}), {}, 400),
    ("logit_bias superscript two", "POST", "/v1/completions",
     json_bytes({"prompt": "x", **SMALL, "logit_bias": {"²": 1}}), {}, 400),
    ("json_schema string", "POST", "/v1/completions",
     json_bytes({"prompt": "x", **SMALL, "response_format": {"type": "json_schema", "json_schema": "x"}}), {}, 400),
    ("surrogate prompt", "POST", "/v1/completions", json_bytes({"prompt": "a \ud800 b", **SMALL}), {}, 400),
    ("surrogate message", "POST", "/v1/chat/completions",
     json_bytes({"messages": [{"role": "user", "content": "hi \ud800"}], **SMALL}), {}, 400),
    ("surrogate system message", "POST", "/v1/chat/completions",
     json_bytes({"messages": [{"role": "system", "content": "\ud800"}, {"role": "user", "content": "hi"}], **SMALL}),
     {}, 400),
    ("nested 5000 deep", "POST", "/v1/completions", nested(5000), {}, 400),
    ("load 300-character path", "POST", "/v1/vectors/load", json_bytes({"path": "a" * 295 + ".gguf"}), {}, 400),
    ("load surrogate path", "POST", "/v1/vectors/load", json_bytes({"path": "\ud800.gguf"}), {}, 400),
    ("upload 1e30 values", "PUT", "/v1/vectors/huge", huge_vector_bytes, {"content-type": "application/octet-stream"},
     400),
    ("overwrite=2", "PUT", "/v1/vectors/happy?overwrite=2", b"GGUF", {"content-type": "application/octet-stream"}, 400),
    ("Host [::1]evil.com", "GET", "/v1/vectors", b"", {"host": "[::1]evil.com"}, 400),
    ("Host localhost:evil.com", "GET", "/v1/vectors", b"", {"host": "localhost:evil.com"}, 400),
]


def send_poison(url: str, case, tmp_path) -> httpx.Response:
    _, method, path, body, headers, _ = case
    content = body(tmp_path) if callable(body) else body
    headers = {"content-type": "application/json", **headers}
    return httpx.request(method, url + path, content=content, headers=headers, timeout=60)


def assert_openai_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["code"] == status
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert isinstance(error["message"], str) and error["message"]


@pytest.mark.parametrize("case", POISON, ids=[case[0] for case in POISON])
def test_each_poisonous_request_gets_its_own_4xx(served, case, tmp_path):
    url, _ = served
    assert_openai_error(send_poison(url, case, tmp_path), case[5])
    assert httpx.get(url + "/v1/vectors", timeout=10).status_code == 200
    assert "huge" not in {v["id"] for v in httpx.get(url + "/v1/vectors", timeout=10).json()["data"]}


def stream_text(url: str, body: dict, started: threading.Event) -> dict:
    """A streamed completion: its text, its finish reason, and when it ended."""
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
            pieces.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
            started.set()
    return {"text": "".join(pieces), "finish_reason": finish, "ended": time.monotonic()}


def test_two_streams_get_their_solo_text_while_a_third_client_sends_every_poison(served, reference, vectors, tmp_path):
    url, server = served
    streams = [{"prompt": "the cat", "temperature": 0, "max_tokens": STREAM_TOKENS},
               {"prompt": "a dog sat", "temperature": 0, "max_tokens": STREAM_TOKENS, "steering": {"happy": 0.8}}]
    expected = [expected_result(reference, vectors, s["prompt"], s.get("steering"), max_tokens=STREAM_TOKENS)
                for s in streams]
    boxes, statuses, slow = [], {}, threading.Event()
    slow.set()
    with nan_logits_for(server.model, slow):
        for body in streams:
            box = {"started": threading.Event()}
            box["thread"] = threading.Thread(target=lambda b=body, x=box: x.update(stream_text(url, b, x["started"])))
            box["thread"].start()
            boxes.append(box)
        for box in boxes:
            assert box["started"].wait(60), "a stream sent nothing"
        # the worker's own failure: NaN logits for this request alone (its 500, not its neighbours')
        statuses["NaN logits"] = httpx.post(url + "/v1/completions", json={"prompt": "a ~ b", **SMALL}, timeout=60)
        for case in POISON:
            statuses[case[0]] = send_poison(url, case, tmp_path)
        poisons_done = time.monotonic()
        slow.clear()
        for box in boxes:
            box["thread"].join(120)
    for box, solo in zip(boxes, expected):
        assert (box["text"], box["finish_reason"]) == (solo.text, solo.finish_reason)
        assert box["ended"] > poisons_done, "a stream ended before the poisonous requests did: slow its decodes down"
    assert_openai_error(statuses.pop("NaN logits"), 500)
    for case in POISON:
        assert_openai_error(statuses[case[0]], case[5])
    after = httpx.post(url + "/v1/completions", json={"prompt": "the cat", **SMALL}, timeout=60)
    assert after.json()["choices"][0]["text"] == expected_result(reference, vectors, "the cat", max_tokens=4).text


# -- the vectors directory: rescan keeps the load rule ---------------------------------------------


def test_rescan_refuses_links_outside_loops_and_directories_and_counts_an_alias_once(tiny_model_path, tmp_path):
    directory = tmp_path / "vectors"
    write_vectors(directory)
    outside = tmp_path / "outside"
    write_vectors(outside)
    with fresh_server(tiny_model_path, directory, ServerConfig(max_batch=2)) as (url, _):
        (directory / "escape.gguf").symlink_to(outside / "happy.gguf")
        (directory / "loop.gguf").symlink_to(directory / "loop.gguf")
        (directory / "folder.gguf").mkdir()
        (directory / "alias.gguf").symlink_to(directory / "honest.gguf")
        response = httpx.post(url + "/v1/vectors/rescan", json={}, timeout=60)
        assert response.status_code == 200, response.text
        scan = response.json()
        errors = {e["file"]: e["error"] for e in scan["errors"]}
        assert scan["vectors"] == ["happy", "honest", "plain"] and scan["added"] == []
        assert set(errors) == {"escape.gguf", "loop.gguf", "folder.gguf", "alias.gguf"}
        assert "outside the vectors directory" in errors["escape.gguf"]
        assert "alias of 'honest'" in errors["alias.gguf"]
        assert "is not a file" in errors["folder.gguf"]
        listed = [v["id"] for v in httpx.get(url + "/v1/vectors", timeout=10).json()["data"]]
        assert sorted(listed) == ["happy", "honest", "plain"]
        # load by path follows the same rule, and an alias loads the file it names, under that file's name
        assert_openai_error(httpx.post(url + "/v1/vectors/load", json={"path": "escape.gguf"}, timeout=10), 400)
        assert_openai_error(httpx.post(url + "/v1/vectors/load", json={"path": "loop.gguf"}, timeout=10), 400)
        assert_openai_error(httpx.post(url + "/v1/vectors/load", json={"path": "folder.gguf"}, timeout=10), 400)
        assert httpx.post(url + "/v1/vectors/load", json={"path": "alias.gguf"}, timeout=10).json()["id"] == "honest"


def test_upload_of_a_huge_vector_is_refused_and_the_directory_is_unchanged(served, tmp_path):
    url, _ = served
    directory = sorted(os.listdir(served[1].registry.directory))
    response = httpx.put(url + "/v1/vectors/huge", content=huge_vector_bytes(tmp_path), timeout=60)
    assert_openai_error(response, 400)
    assert "direction.1 holds a value of 1e+30" in response.json()["error"]["message"]
    assert sorted(os.listdir(served[1].registry.directory)) == directory


@pytest.mark.parametrize(("header", "name"), [
    ("localhost", "localhost"), ("LOCALHOST:8080", "localhost"), ("127.0.0.1:80", "127.0.0.1"), ("[::1]:8080", "::1"),
    ("[::1]", "::1"), ("::1", "::1"), ("example.org", "example.org"),
    # not a host name followed by a port: they match no allowed name
    ("[::1]evil.com", "[::1]evil.com"), ("localhost:evil.com", "localhost:evil.com"), ("[::1]:80x", "[::1]:80x"),
])
def test_host_headers_are_parsed_strictly(header, name):
    from ggsteer.serve.guard import host_name

    assert host_name(header) == name


def test_a_bad_query_parameter_names_itself_in_openai_shape(served):
    url, _ = served
    response = httpx.put(url + "/v1/vectors/happy?overwrite=2", content=b"GGUF", timeout=10)
    assert_openai_error(response, 400)
    assert response.json()["error"]["param"] == "overwrite"
    assert response.json()["error"]["message"].startswith("overwrite: ")
