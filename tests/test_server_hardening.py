"""The server's operator routes, web security and strict inputs (issue 12), on the tiny model."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from support.server import (
    GREEDY,
    expected_result,
    fresh_server,
    metrics,
    write_vectors,
)

from ggsteer.cli import main
from ggsteer.serve import ServerConfig


@pytest.fixture(scope="module")
def served(tiny_model_path, vectors_and_dir):
    with fresh_server(tiny_model_path, vectors_and_dir[1], ServerConfig(max_batch=4)) as (url, app):
        yield url, app.state.server


@pytest.fixture(scope="module")
def keyed(tiny_model_path, vectors_and_dir):
    config = ServerConfig(max_batch=2, api_key="s3cret", allowed_hosts=("localhost", "127.0.0.1", "::1", "box.lan"))
    with fresh_server(tiny_model_path, vectors_and_dir[1], config) as (url, _):
        yield url


# -- /health and /metrics -------------------------------------------------------------------------


def test_health_is_200_while_the_worker_runs(served):
    url, _ = served
    response = httpx.get(f"{url}/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_metrics_count_what_the_server_did(served, reference, vectors_and_dir):
    url, _ = served
    vectors = vectors_and_dir[0]
    before = metrics(url)
    body = {"prompt": "the cat", **GREEDY, "steering": {"happy": 0.8, "honest": 0}}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    after = metrics(url)
    expected = expected_result(reference, vectors, "the cat", {"happy": 0.8})
    assert reply["usage"]["completion_tokens"] == expected.completion_tokens
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta["ggsteer_tokens_generated_total"] == expected.completion_tokens
    assert delta["ggsteer_prompt_tokens_total"] == expected.prompt_tokens
    assert delta['ggsteer_requests_total{outcome="completed"}'] == 1
    assert delta['ggsteer_vector_requests_total{vector="happy"}'] == 1
    assert delta['ggsteer_vector_requests_total{vector="honest"}'] == 0  # strength 0 steers nothing
    assert delta["ggsteer_decodes_total"] >= expected.completion_tokens
    assert delta["ggsteer_decode_seconds_total"] > 0
    assert after["ggsteer_requests_processing"] == 0 and after["ggsteer_requests_queued"] == 0
    assert after["ggsteer_up"] == 1


def test_metrics_are_prometheus_text(served):
    url, _ = served
    response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    assert "# TYPE ggsteer_tokens_generated_total counter" in lines
    assert "# TYPE ggsteer_requests_processing gauge" in lines


# -- the event loop -------------------------------------------------------------------------------


def test_tokenization_runs_off_the_event_loop(served):
    url, server = served
    model = server.model
    threads_with_a_loop = []

    def tokenize_prompt(prompt):
        try:
            asyncio.get_running_loop()
            threads_with_a_loop.append(True)
        except RuntimeError:
            threads_with_a_loop.append(False)
        return type(model).tokenize_prompt(model, prompt)

    model.tokenize_prompt = tokenize_prompt
    try:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", **GREEDY}, timeout=60)
    finally:
        del model.tokenize_prompt
    assert response.status_code == 200
    assert threads_with_a_loop == [False]


# -- web security ---------------------------------------------------------------------------------


def test_bodies_must_be_json(served):
    url, _ = served
    before = metrics(url)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {} if content_type is None else {"content-type": content_type}
        response = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 3}', headers=headers)
        assert response.status_code == 415, content_type
        assert "application/json" in response.json()["error"]["message"]
    ok = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "hi", "max_tokens": 3}',
                    headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert ok.status_code == 200
    # none of the refused requests reached the worker
    completed = 'ggsteer_requests_total{outcome="completed"}'
    assert metrics(url)[completed] == before[completed] + 1


def test_only_loopback_host_names_by_default(served):
    url, _ = served
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "0.0.0.0"):
        for method, path in (("GET", "/v1/vectors"), ("POST", "/v1/completions"), ("GET", "/"), ("GET", "/health")):
            response = httpx.request(method, f"{url}{path}", headers={"host": host}, json={"prompt": "x"})
            assert response.status_code == 400, (host, path)
            assert "--allowed-hosts" in response.json()["error"]["message"]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(f"{url}/v1/vectors", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_and_the_api_key_guard_the_docs(keyed):
    key = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{keyed}/v1/vectors", headers={"host": "box.lan:80", **key}).status_code == 200
    assert httpx.get(f"{keyed}/v1/vectors", headers={"host": "other.lan", **key}).status_code == 400
    for path in ("/openapi.json", "/docs", "/redoc"):
        refused = httpx.get(f"{keyed}{path}")
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{keyed}{path}", headers={"Authorization": "Bearer nope"}).status_code == 401
    described = httpx.get(f"{keyed}/openapi.json", headers=key)
    assert described.status_code == 200 and "/v1/completions" in described.json()["paths"]
    assert httpx.get(f"{keyed}/metrics").status_code == 401
    assert httpx.get(f"{keyed}/metrics", headers=key).status_code == 200
    assert httpx.get(f"{keyed}/health").status_code == 200  # for load balancers, without the key


# -- strict inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "x", "steering": {"happy": 1%s}}' % ("0" * 319), r"within \+-10"),
        ('{"prompt": "x", "steering": {"happy": -1%s}}' % ("0" * 319), r"within \+-10"),
        ('{"prompt": "x", "steering": {"happy": 1%s}}' % ("0" * 5000), "not valid JSON"),
        ('{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
        ('{"prompt": "x", "max_tokens": true}', "max_tokens"),
        ('{"prompt": "x", "max_tokens": 5.0}', "max_tokens"),
        ('{"prompt": "x", "temperature": "0.5"}', "temperature"),
        ('{"prompt": "x", "stream": "yes"}', "stream"),
        ('{"prompt": "x", "stream": 1}', "stream"),
        ('{"prompt": "x", "seed": "7"}', "seed"),
        ('{"prompt": "x", "seed": 1%s}' % ("0" * 320), "seed"),
        ('{"prompt": "x", "temperature": 1%s}' % ("0" * 320), "temperature"),
        ('{"prompt": 5}', "prompt"),
    ],
)
def test_wrongly_typed_or_huge_values_get_400(served, content, message):
    import re

    url, _ = served
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert re.search(message, response.json()["error"]["message"])
    assert len(response.json()["error"]["message"]) < 300


def test_integer_strengths_and_temperatures_are_still_numbers(served):
    url, _ = served
    body = {"prompt": "x", "max_tokens": 3, "temperature": 0, "top_p": 1, "steering": {"happy": 1}}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


# -- the serve command ----------------------------------------------------------------------------


def test_a_busy_port_is_reported_before_the_model_loads(tmp_path, tiny_model_path, capsys, monkeypatch):
    import ggsteer.cli.serve as serve_command

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(serve_command, "load_model", load_model)
    write_vectors(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main(["serve", "--model", str(tiny_model_path), "--vectors", str(tmp_path), "--port", str(port)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.strip().splitlines() == [(f"ggsteer: error: port {port} on 127.0.0.1 is already in use: "
                                           "stop the other server or pick another --port")]


@pytest.mark.parametrize(("option", "value", "message"),
                         [("--max-queue", "0", "--max-queue"), ("--port", "70000", "--port")])
def test_bad_serve_options_get_one_line(tmp_path, tiny_model_path, capsys, option, value, message):
    write_vectors(tmp_path)
    assert main(["serve", "--model", str(tiny_model_path), "--vectors", str(tmp_path), option, value]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


# -- issue 24: every steering field typed and bounded before it reaches the worker -----------------

JSON_HEADERS = {"content-type": "application/json"}


def openai_error(response, status: int = 400) -> dict:
    """The error object of a refused request, which must be OpenAI's shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", status)
    return error


def steered_text(url: str, setting) -> str:
    body = {"prompt": "the cat", **GREEDY, "steering": {"happy": setting}}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("first_k", ["1e300", str(10**30), "1e400", "2147483648", "true", "2.0"])
def test_first_k_beyond_the_hook_gets_400_and_the_worker_is_not_restarted(served, first_k):
    """issue 24 item 1: 1e300 and 10**30 passed validation, then overflowed while the worker built the
    hook program (500, worker restart, a neighbour's stream broken); 1e400 was a 500 too."""
    url, _ = served
    restarts = metrics(url).get("ggsteer_worker_restarts_total", 0.0)
    content = '{"prompt": "the cat", "max_tokens": 2, "steering": {"happy": {"strength": 0.5, "first_k": FIRST_K}}}'
    error = openai_error(httpx.post(f"{url}/v1/completions", content=content.replace("FIRST_K", first_k),
                                    headers=JSON_HEADERS))
    assert error["param"] == "steering" and error["message"].startswith("steering.happy: first_k must be")
    # the same as a server-wide default is refused too, and the default stays as it was
    default = '{"steering": {"happy": {"strength": 0.5, "first_k": FIRST_K}}}'.replace("FIRST_K", first_k)
    openai_error(httpx.post(f"{url}/v1/steering", content=default, headers=JSON_HEADERS))
    assert httpx.get(f"{url}/v1/steering").json()["steering"] == {}
    # positive control: the largest first_k the hook takes steers like no limit at all
    assert steered_text(url, {"strength": 0.5, "first_k": 2**31 - 1}) == steered_text(url, 0.5)
    assert metrics(url).get("ggsteer_worker_restarts_total", 0.0) == restarts


@pytest.mark.parametrize("layers", ["1-20000000", "0-99999999999999999999", "2,1-20000000", [1, 20000000]])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/steering"])
def test_huge_layer_ranges_are_refused_by_the_models_size_before_they_are_expanded(served, layers, path):
    """issue 24 item 3: "1-20000000" was expanded (4 s on the event loop, 48 MB) before its 400."""
    url, _ = served
    body = {"steering": {"happy": {"strength": 0.5, "layers": layers}}}
    if path == "/v1/completions":
        body |= {"prompt": "the cat", "max_tokens": 2}
    error = openai_error(httpx.post(f"{url}{path}", json=body, timeout=60))
    number = "99999999... (20 digits)" if "999" in str(layers) else "20000000"
    assert error["message"] == f"steering.happy: layer {number} is beyond the model: it has layers 0..2"
    assert steered_text(url, {"strength": 0.5, "layers": "1-2"}) == steered_text(url, 0.5)  # the vector's own layers


@pytest.mark.parametrize(("field", "value", "param"), [
    ("n", True, "n"), ("best_of", True, "best_of"), ("n", 1.0, "n"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ("stream_options", {"include_usage": 1}, "stream_options.include_usage"),
    ("steering", {"happy": {"strength": 0.5, "first_k": True}}, "steering"),
    ("steering", {"happy": {"strength": 0.5, "skip_first": True}}, "steering"),
    ("steering", {"happy": True}, "steering"),
])
def test_booleans_are_not_numbers_and_strings_are_not_booleans(served, field, value, param):
    """issue 24 item 7: `true` was taken as n and first_k, and "yes" as include_usage."""
    url, _ = served
    body = {"prompt": "the cat", "max_tokens": 2, "stream": True, field: value}
    error = openai_error(httpx.post(f"{url}/v1/completions", json=body, timeout=60))
    assert error["param"] == param


def test_the_well_typed_forms_of_those_fields_are_served(served):
    """The positive control of the test above: the same fields with their JSON types are accepted."""
    url, _ = served
    body = {"prompt": "the cat", "max_tokens": 2, "n": 1, "best_of": 1, "stream": True,
            "stream_options": {"include_usage": True}, "steering": {"happy": {"strength": 0.5, "first_k": 1}}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert '"usage"' in events[-1]


def test_server_defaults_and_limits_are_defined_once():
    """`ggsteer serve`'s option defaults, ServerConfig and the worker take theirs from serve/settings.py,
    and the CLI and the server share one temperature limit."""
    import argparse
    import inspect

    from annotated_types import Le

    from ggsteer.cli.main import build_parser
    from ggsteer.sampling import MAX_TEMPERATURE
    from ggsteer.serve import settings
    from ggsteer.serve.schemas import GenerationRequest
    from ggsteer.serve.worker import BatchWorker

    parser = build_parser()
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    defaults = {flag: action.default for action in serve._actions for flag in action.option_strings}
    config = ServerConfig()
    assert defaults["--max-batch"] == config.max_batch == settings.DEFAULT_MAX_BATCH
    assert defaults["--max-queue"] == config.max_queue == settings.DEFAULT_MAX_QUEUE
    assert inspect.signature(BatchWorker).parameters["max_queue"].default == settings.DEFAULT_MAX_QUEUE
    assert defaults["--batch-wait-ms"] / 1000 == config.batch_wait_s == settings.DEFAULT_BATCH_WAIT_S
    assert (defaults["--host"], defaults["--port"]) == (settings.DEFAULT_HOST, settings.DEFAULT_PORT)
    limits = [m.le for m in GenerationRequest.model_fields["temperature"].metadata if isinstance(m, Le)]
    assert limits == [MAX_TEMPERATURE]
