"""Request bodies: reading JSON strictly and validating it into pydantic models."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ggsteer.sampling import DEFAULTS, MAX_TEMPERATURE
from ggsteer.serve.errors import ApiError
from ggsteer.serve.json_checks import MAX_JSON_DEPTH, check_json_value
from ggsteer.serve.settings import MAX_BODY_BYTES, MAX_STOP_STRINGS
from ggsteer.steering.options import short_repr

# -- request bodies -----------------------------------------------------------------------------

# OpenAI fields ggsteer does not implement: a request setting one gets 400 naming it, never a 200
# that silently ignored it. Values that ask for nothing (null, false, empty, "none") are accepted.
UNSUPPORTED_FIELDS = {
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "the model has no reasoning settings",
    "verbosity": "the model has no verbosity setting",
    "suffix": "insertion (suffix) is not supported",
    "echo": "echoing the prompt is not supported",
}


def asks_for_nothing(value) -> bool:
    return (value is None or value is False or value in ("", "none", "auto")
            or (isinstance(value, (list, dict)) and not value))


def check_unsupported_fields(data: dict) -> None:
    for name, why in UNSUPPORTED_FIELDS.items():
        if name in data and not asks_for_nothing(data[name]):
            raise ApiError(400, f"{name}: {why} by this server (ggsteer)", name)
    for name in ("n", "best_of"):
        # `true == 1` in Python: the type is checked too (booleans are not numbers here)
        if name in data and data[name] is not None and not (type(data[name]) is int and data[name] == 1):
            raise ApiError(400, f"{name}={short_repr(data[name])}: ggsteer returns one choice per request; send "
                                "several requests instead (they are batched together)", name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # "yes" or 1 is not a boolean

    include_usage: bool = False


class GenerationRequest(BaseModel):
    # strict: JSON types as declared ("5" or true is no max_tokens); ints are still accepted as floats
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # accepted for OpenAI clients; the server has one model
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    temperature: float = Field(DEFAULTS.temperature, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(DEFAULTS.top_p, gt=0.0, le=1.0)
    # llama-server's sampling fields, with its defaults (ggsteer.sampling.DEFAULTS)
    top_k: int = Field(DEFAULTS.top_k, ge=0)
    min_p: float = Field(DEFAULTS.min_p, ge=0.0, le=1.0)
    repeat_penalty: float = Field(DEFAULTS.repeat_penalty, gt=0.0, le=10.0)
    repeat_last_n: int = Field(DEFAULTS.repeat_last_n, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(DEFAULTS.presence_penalty, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(DEFAULTS.frequency_penalty, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: dict | None = None
    # None: the server-wide default steering; {}: no steering at all (opts out of the default)
    steering: dict[str, object] | None = None

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data):
        if isinstance(data, dict):
            check_unsupported_fields(data)
        return data

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_usage_chunk(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def n_logprobs(self) -> int | None:
        """How many alternatives to report with each token's logprob; None: no logprobs."""
        return None

    def checked_logit_bias(self, n_vocab: int) -> tuple[tuple[int, float], ...]:
        items = []
        for key, bias in (self.logit_bias or {}).items():
            # str.isdigit() also takes "²" and other digits int() refuses or reads differently
            if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) >= n_vocab:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0..{n_vocab - 1})",
                               "logit_bias")
            if not -100.0 <= bias <= 100.0:
                raise ApiError(400, f"logit_bias: the bias for token {key} is {bias}: it must be within -100..100",
                               "logit_bias")
            items.append((int(key), float(bias)))
        return tuple(items)

    def grammar(self) -> str | None:
        """GBNF for response_format: JSON mode, or a JSON schema (llama-cpp-python's converter)."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return JSON_GBNF
        if kind != "json_schema":
            raise ApiError(400, f"response_format: unknown type {kind!r}; use text, json_object or json_schema",
                           "response_format")
        wrapper = self.response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema: give the JSON schema as an object",
                           "response_format")
        try:
            return json_schema_to_gbnf(json.dumps(schema))
        except Exception as error:  # noqa: BLE001 - the converter raises what it likes on schemas it cannot express
            raise ApiError(400, f"response_format.json_schema.schema: cannot be turned into a grammar: {error}",
                           "response_format") from None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        return stops


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)  # completions: the number of alternatives

    def n_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "prompt must be one string (batching happens server-side)", "prompt")
        return self.prompt[0]


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for system instructions
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]  # a string, or content parts of which only text parts are supported
    name: str | None = None

    def as_prompt_message(self) -> dict:
        role = "system" if self.role == "developer" else self.role
        content = self.content if isinstance(self.content, str) else "\n".join(part["text"] for part in self.content)
        return {"role": role, "content": content}


def check_content_parts(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        for j, part in enumerate([] if isinstance(message.content, str) else message.content):
            where = f"messages.{i}.content.{j}"
            if part.get("type") != "text":
                raise ApiError(400, f"{where}.type: content parts of type {part.get('type')!r} are not supported "
                                    "(the model reads text only)", f"{where}.type")
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}.text: a text part needs a string 'text'", f"{where}.text")


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def check_parts_and_logprobs(self):
        check_content_parts(self.messages)
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs: set logprobs to true to use top_logprobs", "top_logprobs")
        return self

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


async def read_json_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict:
    """The body as a JSON object: 413 over `limit` bytes (checked while reading), 400 if not JSON."""
    data = await read_json_value(request, limit)
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


async def read_json_value(request: Request, limit: int = MAX_BODY_BYTES):
    """The body as any JSON value, read as read_json_body reads it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes")
    try:
        data = json.loads(body)
    except ValueError as error:  # also UnicodeDecodeError, and integers over Python's 4300-digit limit
        raise ApiError(400, f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    check_json_value(data)
    return data


def parse_request(model_class: type[BaseModel], data: dict):
    try:
        return model_class.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", where) from None
