"""The request schema fuzzed (hypothesis, fixed seed): every body is answered 200, or 4xx with OpenAI's
error object, never 500; a streamed 200 carries no error event; and afterwards the server still gives
a normal request its greedy text (issue 24)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import GREEDY, fresh_server, write_vectors

from ggsteer.serve import ServerConfig
from ggsteer.serve.registry import STEERING_KEYS
from ggsteer.steering.options import OPS, WHEN

JSON_HEADERS = {"content-type": "application/json"}
PROMPT = "the cat sat"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30, 1e300, "1", "yes", "", "none", "auto"]),
)
# any JSON value: what a careless or hostile client sends where a field expects something else
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                              max_size=3), max_leaves=8)


NAN, INF = float("nan"), float("inf")
hostile_integers = st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63, 10**30, 1e300, INF, 2.0, True, "3"])
# per steering setting: values a valid request holds, and values of the right shape but out of bounds
# (what reached the worker before issue 24's fixes)
valid_values = {
    "strength": st.floats(0.1, 2) | st.floats(-2, -0.1), "op": st.sampled_from(OPS), "when": st.sampled_from(WHEN),
    "layers": st.sampled_from(["2", [2], "1-2", [1, 2]]), "first_k": st.integers(1, 8),
    "skip_first": st.integers(0, 3),
    "condition": st.fixed_dictionaries({"vector": st.just("honest"), "threshold": st.floats(-1, 1),
                                        "layer": st.just(1)}),
}
hostile_values = {
    "strength": st.sampled_from([10**400, 1e300, 10.5, True, NAN, INF, "1"]), "op": st.just("bogus"),
    "when": st.just("later"), "first_k": hostile_integers, "skip_first": hostile_integers,
    "layers": st.sampled_from(["1-20000000", "0-" + "9" * 30, [True], [], "2-1", [10**30], "x", [2.0]]),
    "condition": st.sampled_from([{"vector": "sad", "threshold": 0.1, "layer": 1}, {"vector": "honest"},
                                  {"vector": "honest", "threshold": NAN, "layer": 1},
                                  {"vector": "honest", "threshold": 0.1, "layer": 10**30},
                                  {"vector": "honest", "threshold": 0.1, "layer": True}]),
}
assert set(valid_values) == set(hostile_values) == set(STEERING_KEYS)  # every setting the server takes is fuzzed
common_fields = {
    "max_tokens": st.integers(1, 3), "max_completion_tokens": st.integers(1, 3), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**63 - 1), "stop": st.lists(st.text(max_size=3, min_size=1),
                                                                                    max_size=4),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "n": st.just(1), "best_of": st.just(1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "5", "47"]), st.floats(-100, 100), max_size=2),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
}


@st.composite
def setting(draw):
    """A valid setting for one vector: a strength, or an object of settings."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.floats(-2, 2))
    keys = draw(st.sets(st.sampled_from(sorted(valid_values))))
    value = {key: draw(valid_values[key]) for key in keys | {"strength"}}
    if "condition" in value:
        value["layers"] = "2"  # the condition reads layer 1: steering must come after it
    return value


@st.composite
def fuzzed(draw, path: str, required: dict, optional: dict):
    """A valid body, then most often one thing broken: a steering setting made hostile or any JSON value,
    or one field replaced by any JSON value."""
    body = draw(st.fixed_dictionaries(required, optional=optional))
    body["steering"] = draw(st.dictionaries(st.sampled_from(["happy", "honest", "plain"]), setting(), max_size=2))
    how = draw(st.sampled_from(["none", "hostile", "hostile", "setting", "field", "vector"]))
    settings_ = [(name, value) for name, value in body["steering"].items() if isinstance(value, dict)]
    if how in ("hostile", "setting") and settings_:
        _, value = draw(st.sampled_from(settings_))
        key = draw(st.sampled_from(sorted(valid_values)))
        value[key] = draw(hostile_values[key] if how == "hostile" else anything)
    elif how == "field":
        body[draw(st.sampled_from(sorted(set(required) | set(optional) | {"steering"})))] = draw(anything)
    elif how == "vector":
        body["steering"][draw(st.sampled_from(["sad", "happy", ""]))] = draw(anything)
    return path, body


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.text(max_size=12)})
requests = st.one_of(
    fuzzed("/v1/completions", {"prompt": st.text(max_size=12)}, common_fields | {"logprobs": st.integers(0, 5)}),
    fuzzed("/v1/chat/completions", {"messages": st.lists(message, min_size=1, max_size=3)},
           common_fields | {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)}),
    fuzzed("/v1/steering", {}, {}),
)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_model_path, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz_vectors")
    write_vectors(directory)
    with fresh_server(tiny_model_path, directory, ServerConfig(max_batch=4)) as (url, _), \
            httpx.Client(base_url=url, timeout=120) as client:
        yield client


def greedy_text(client) -> str:
    body = {"prompt": PROMPT, **GREEDY, "steering": {"happy": {"strength": 0.5, "first_k": 4}}}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def check_answer(client, path: str, body: dict) -> None:
    content = json.dumps(body)  # NaN and Infinity as Python writes them: the server's JSON reader takes them
    with client.stream("POST", path, content=content, headers=JSON_HEADERS) as response:
        payload = response.read().decode()
    status = response.status_code
    if status == 200:
        events = [line[6:] for line in payload.splitlines() if line.startswith("data: {")]
        assert not any('"error"' in event and json.loads(event).get("error") for event in events), (body, payload)
        return
    assert 400 <= status < 500, (status, body, payload)
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}, payload
    assert error["type"] == "invalid_request_error" and error["code"] == status and error["message"], payload


def test_fuzzed_requests_get_200_or_an_openai_4xx_and_never_hurt_the_server(fuzzed_server):
    client = fuzzed_server
    before = greedy_text(client)

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests)
    def answer(request):
        path, body = request
        check_answer(client, path, body)
        if path == "/v1/steering":  # a default that was accepted would steer every later request
            assert client.delete("/v1/steering").status_code == 200

    answer()
    assert client.get("/health").status_code == 200
    assert greedy_text(client) == before
