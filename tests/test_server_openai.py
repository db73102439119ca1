"""The server driven by the official `openai` client (what chat apps use), on the tiny model.

Texts are compared with the same request through the batch alone on a second model instance
(test_server.expected_result); the sampling options themselves are checked against numpy in
test_sampling_options.py, so here the server must hand them to the batch and shape the answer.
"""

from __future__ import annotations

import json

import httpx
import pytest
from support.server import (
    TOKENS,
    expected_result,
    fresh_server,
    transcript,
    write_vectors,
)

from ggsteer.generation import ContinuousBatch, SequenceSampling
from ggsteer.serve import ServerConfig

openai = pytest.importorskip("openai")

CHAT_STOPS = ["\nUser:", "\n\n\n"]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vectors")
    return directory, write_vectors(directory)


@pytest.fixture(scope="module")
def base_url(tiny_model_path, vectors):
    with fresh_server(tiny_model_path, vectors[0], ServerConfig(max_batch=8)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def alone(reference, vectors, prompt, steering=None, stop=None, max_tokens=TOKENS):
    return expected_result(reference, vectors[1], prompt, steering, stop, max_tokens)


def batch_alone(model, prompt: str, sampling: SequenceSampling):
    """One unsteered sequence with these sampling options, alone in a batch: its result."""
    with ContinuousBatch(model) as batch:
        state = batch.add(model.tokenize_prompt(prompt), [], sampling)
        while batch.active:
            batch.step()
    return state.result()


# -- generation through the client ----------------------------------------------------------------


def test_completion_with_extra_body_steering(client, reference, vectors):
    result = client.completions.create(model="tiny", prompt="the cat sat on", max_tokens=TOKENS, temperature=0,
                                       extra_body={"steering": {"happy": 0.8}})
    expected = alone(reference, vectors, "the cat sat on", {"happy": 0.8})
    assert result.choices[0].text == expected.text
    assert result.choices[0].text != alone(reference, vectors, "the cat sat on").text
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (expected.prompt_tokens,
                                                                            expected.completion_tokens)


def test_chat_accepts_developer_role_and_text_parts(client, reference, vectors):
    parts = [{"role": "developer", "content": "Be nice."},
             {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hello\nthere"}]
    answers = [client.chat.completions.create(model="tiny", messages=m, max_tokens=TOKENS, temperature=0,
                                              extra_body={"steering": {"honest": 0.7}}).choices[0].message.content
               for m in (parts, plain)]
    prompt = "Be nice.\n\nUser: hello\nthere\nAssistant:"
    assert answers == [alone(reference, vectors, prompt, {"honest": 0.7}, CHAT_STOPS).text.lstrip()] * 2


def test_streamed_chat_sends_a_final_usage_chunk(client, reference, vectors):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "you"}], "max_tokens": TOKENS,
               "temperature": 0, "extra_body": {"steering": {"happy": -0.5}}}
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    expected = alone(reference, vectors, transcript("you"), {"happy": -0.5}, CHAT_STOPS)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text.lstrip()
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (expected.prompt_tokens,
                                                                                    expected.completion_tokens)
    without = list(client.chat.completions.create(**request, stream=True))
    assert all(c.usage is None for c in without) and without[-1].choices[0].finish_reason == expected.finish_reason


def test_streamed_completion_with_usage(client, reference, vectors):
    chunks = list(client.completions.create(model="tiny", prompt="a dog", max_tokens=TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    expected = alone(reference, vectors, "a dog")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_max_completion_tokens_limits_the_reply(client, reference, vectors):
    result = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_completion_tokens=3, max_tokens=50, temperature=0)
    assert (result.usage.completion_tokens, result.choices[0].finish_reason) == (3, "length")
    assert result.choices[0].message.content == alone(reference, vectors, transcript("hi"), max_tokens=3,
                                                      stop=CHAT_STOPS).text.lstrip()


def test_penalties_reach_the_sampler(client, reference):
    options = {"presence_penalty": 0.8, "frequency_penalty": 0.6}
    result = client.completions.create(model="tiny", prompt="i am happy", max_tokens=40, temperature=0, **options)
    penalized = batch_alone(reference, "i am happy", SequenceSampling(40, **options))
    assert result.choices[0].text == penalized.text
    assert penalized.text != batch_alone(reference, "i am happy", SequenceSampling(40)).text


def test_chat_logprobs(client, reference):
    result = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=3, extra_body={"steering": {}})
    expected = batch_alone(reference, transcript("hi"), SequenceSampling(6, stop=tuple(CHAT_STOPS), logprobs=3))
    content = result.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == [e.logprob for e in expected.logprobs]
    assert [entry.bytes for entry in content] == [list(reference.detokenize([t])) for t in expected.tokens]
    assert ([[top.logprob for top in entry.top_logprobs] for entry in content]
            == [[lp for _, lp in e.top] for e in expected.logprobs])
    assert all(entry.top_logprobs[0].logprob >= entry.logprob for entry in content)  # greedy took the best


def test_completion_logprobs(client, reference):
    result = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, logprobs=2)
    expected = batch_alone(reference, "the cat", SequenceSampling(5, logprobs=2))
    logprobs = result.choices[0].logprobs
    assert logprobs.token_logprobs == [e.logprob for e in expected.logprobs]
    # tokens that are parts of a UTF-8 character show as U+FFFD; the text drops them
    assert "".join(logprobs.tokens).replace("\ufffd", "") == result.choices[0].text == expected.text
    assert [len(top) for top in logprobs.top_logprobs] == [2] * 5


# -- models and errors ----------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    listed = client.models.list().data
    assert len(listed) == 1 and isinstance(listed[0].created, int) and listed[0].created > 1_600_000_000
    assert client.models.retrieve(listed[0].id).id == listed[0].id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_unknown_routes_and_methods_answer_in_openai_shape(base_url):
    for method, path, status in (("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405),
                                 ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, base_url + path)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["code"] == status and error["type"] == "invalid_request_error" and path in error["message"]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"n": 2}, "n"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"extra_body": {"audio": {"voice": "alloy"}}}, "audio"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages.0.content.0.type"),
])
def test_unsupported_or_bad_fields_raise_bad_request(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{**CHAT, **extra})
    assert caught.value.body["param"] == param
    assert param.split(".")[0] in caught.value.body["message"]


def test_fields_that_ask_for_nothing_are_accepted(client):
    result = client.chat.completions.create(**CHAT, max_tokens=2, tools=None, n=1, response_format={"type": "text"},
                                            extra_body={"tool_choice": "none"})
    assert result.usage.completion_tokens == 2


def test_bad_steering_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="unknown vector 'sad'"):
        client.completions.create(model="tiny", prompt="x", extra_body={"steering": {"sad": 1}})


def test_api_key_errors_are_the_clients_authentication_error(tiny_model_path, vectors):
    with fresh_server(tiny_model_path, vectors[0], ServerConfig(api_key="s3cret", max_batch=2)) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert httpx.post(f"{url}/v1/steering", json={"steering": {}}).status_code == 401
        assert httpx.get(f"{url}/control-vectors").status_code == 401


SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["calm", "happy"]}, "score": {"type": "integer"}},
          "required": ["mood", "score"], "additionalProperties": False}


def test_json_schema_response_format(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "mood", "schema": SCHEMA}}
    for seed in (1, 2):
        result = client.chat.completions.create(**CHAT, max_tokens=60, temperature=0.9, seed=seed,
                                                response_format=response_format,
                                                extra_body={"steering": {"happy": 0.5}})
        value = json.loads(result.choices[0].message.content)
        assert (set(value) == {"mood", "score"} and value["mood"] in ("calm", "happy")
                and isinstance(value["score"], int))
        assert result.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(**CHAT, max_tokens=20, temperature=0.9, seed=1)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)


def test_json_mode_streams_json(client):
    # seed 5 closes its object early on the random model; other seeds write long strings until max_tokens
    request = dict(**CHAT, max_tokens=40, temperature=0.8, seed=5, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**request).choices[0]
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert whole.finish_reason == "stop"
    assert isinstance(json.loads(whole.message.content), dict)
