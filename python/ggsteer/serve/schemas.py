"""Request bodies: reading JSON strictly and validating it into pydantic models."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ggsteer.serve.errors import ApiError
from ggsteer.serve.settings import DEFAULT_TEMPERATURE, MAX_BODY_BYTES, MAX_STOP_STRINGS

# -- request bodies -----------------------------------------------------------------------------


class GenerationRequest(BaseModel):
    # strict: JSON types as declared ("5" or true is no max_tokens); ints are still accepted as floats
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # accepted for OpenAI clients; the server has one model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    steering: dict[str, object] = Field(default_factory=dict)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        return stops


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, "prompt must be one string (batching happens server-side)", "prompt")
        return self.prompt[0]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


async def read_json_body(request: Request, limit: int = MAX_BODY_BYTES) -> dict:
    """The body as a JSON object: 413 over `limit` bytes (checked while reading), 400 if not JSON."""
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
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def parse_request(model_class: type[BaseModel], data: dict):
    try:
        return model_class.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", where) from None
