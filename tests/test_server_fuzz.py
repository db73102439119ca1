"""The request schema fuzzed (hypothesis, fixed seed): every body is answered 200, or 4xx with OpenAI's
error object, never 500; a streamed 200 carries no error event; and afterwards the server still gives
a normal request its greedy text (issue 24)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import GREEDY, fresh_server, write_vectors

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


def or_anything(valid):
    return st.one_of(valid, valid, anything)


layer_specs = st.one_of(st.sampled_from(["1-2", "1", "2", "0-2", "1-20000000", "2-1", "x", "1,2", "0-" + "9" * 30]),
                        st.lists(st.integers(-1, 4), max_size=4))
condition = st.fixed_dictionaries({"vector": st.sampled_from(["happy", "honest", "sad"]),
                                   "threshold": st.floats(-1.5, 1.5), "layer": st.integers(-1, 3)})
setting_values = {
    "strength": st.one_of(st.floats(-12, 12), st.integers(-12, 12)), "op": st.sampled_from(OPS + ("bogus",)),
    "when": st.sampled_from(WHEN + ("later",)), "layers": layer_specs,
    "first_k": st.one_of(st.integers(-1, 2**32), st.sampled_from([1e300, 2.0])),
    "skip_first": st.one_of(st.integers(-1, 2**32), st.just(1.5)), "condition": condition,
}
assert set(setting_values) == set(STEERING_KEYS)  # the fuzz covers every steering setting the server takes
setting = st.one_of(st.floats(-12, 12), st.fixed_dictionaries(
    {}, optional={key: or_anything(value) for key, value in setting_values.items()} | {"scale": st.just(1)}))
steering = or_anything(st.dictionaries(st.sampled_from(["happy", "honest", "plain", "sad"]), setting, max_size=2))

common_fields = {
    "max_tokens": or_anything(st.integers(1, 3)), "max_completion_tokens": or_anything(st.integers(1, 3)),
    "temperature": or_anything(st.floats(0, 2.5)), "top_p": or_anything(st.floats(0, 1)),
    "seed": or_anything(st.integers(0, 2**64)), "stop": or_anything(st.lists(st.text(max_size=3), max_size=5)),
    "stream": or_anything(st.booleans()),
    "stream_options": or_anything(st.fixed_dictionaries({}, optional={"include_usage": or_anything(st.booleans())})),
    "n": or_anything(st.just(1)), "best_of": or_anything(st.just(1)),
    "presence_penalty": or_anything(st.floats(-3, 3)), "frequency_penalty": or_anything(st.floats(-3, 3)),
    "logit_bias": or_anything(st.dictionaries(st.sampled_from(["0", "5", "47", "99999", "-1", "x"]),
                                              st.floats(-150, 150), max_size=2)),
    "response_format": or_anything(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])})),
    "steering": steering,
}
completion = st.fixed_dictionaries({"prompt": or_anything(st.text(max_size=12))},
                                   optional=common_fields | {"logprobs": or_anything(st.integers(0, 6))})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot"]),
                                 "content": or_anything(st.text(max_size=12))})
chat = st.fixed_dictionaries({"messages": or_anything(st.lists(message, min_size=1, max_size=3))},
                             optional=common_fields | {"logprobs": or_anything(st.booleans()),
                                                       "top_logprobs": or_anything(st.integers(0, 21))})
requests = st.one_of(st.tuples(st.just("/v1/completions"), completion), st.tuples(st.just("/v1/chat/completions"), chat),
                     st.tuples(st.just("/v1/steering"), st.fixed_dictionaries({"steering": steering})))


@pytest.fixture(scope="module")
def fuzzed_server(tiny_model_path, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz_vectors")
    write_vectors(directory)
    with fresh_server(tiny_model_path, directory, ServerConfig(max_batch=4)) as (url, _):
        with httpx.Client(base_url=url, timeout=120) as client:
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
