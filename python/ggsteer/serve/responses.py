"""What clients receive: visible text (stop strings held back), OpenAI response shapes, SSE."""

from __future__ import annotations

import json
import time
import uuid

from ggsteer.serve.errors import ApiError
from ggsteer.serve.worker import Job

# -- streaming text ------------------------------------------------------------------------------


class VisibleText:
    """What a client sees of a generation, the same whether streamed or not.

    Streaming holds back a tail that could still grow into a stop string (the batch cuts the
    stop from its final text, but its pieces may already hold the stop's first characters), and
    chat replies to a transcript lose the space after "Assistant:".
    """

    def __init__(self, stops: list[str], strip_leading: bool):
        self.stops = stops
        self.strip_leading = strip_leading
        self.raw = ""
        self.sent = 0

    def visible(self, raw: str) -> str:
        return raw.lstrip() if self.strip_leading else raw

    def add(self, piece: str) -> str:
        """The new text that can safely be sent after `piece`."""
        self.raw += piece
        text = self.visible(self.raw)
        end = len(text) - self._stop_prefix_length(text)
        return self._advance(text, end)

    def finish(self, final_raw: str) -> str:
        """The rest of the final text (after stop strings were cut)."""
        text = self.visible(final_raw)
        return self._advance(text, len(text))

    def _advance(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        new = text[self.sent:end]
        self.sent = end
        return new

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest



def token_entry(model, token: int, logprob: float) -> dict:
    data = model.detokenize([token])
    return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}


def chat_logprobs(model, logprobs) -> dict | None:
    """OpenAI's chat `logprobs` object for a result's TokenLogprob entries (None: not asked for)."""
    if logprobs is None:
        return None
    return {"content": [{**token_entry(model, e.token, e.logprob),
                         "top_logprobs": [token_entry(model, t, lp) for t, lp in e.top]} for e in logprobs]}


def completion_logprobs(model, logprobs) -> dict | None:
    """OpenAI's legacy completions `logprobs` object (offsets count from the completion's start)."""
    if logprobs is None:
        return None
    tokens = [token_entry(model, e.token, e.logprob)["token"] for e in logprobs]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [{token_entry(model, t, lp)["token"]: lp for t, lp in e.top} for e in logprobs]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in logprobs], "top_logprobs": top,
            "text_offset": offsets}


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def wait_for_result(job: Job):
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise ApiError(500, value)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class CompletionShape:
    """OpenAI `text_completion` objects."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _wrap(self, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, "logprobs": None, **choice}], **extra}

    def full(self, text: str, finish_reason: str, usage: dict, logprobs=None) -> dict:
        return self._wrap({"text": text, "finish_reason": finish_reason, "logprobs": logprobs}, usage=usage)

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return self._wrap({"text": text, "finish_reason": None})

    def closing(self, finish_reason: str, logprobs=None) -> dict:
        # a stream's logprobs come whole in its last chunk (pieces are text, not tokens)
        return self._wrap({"text": "", "finish_reason": finish_reason, "logprobs": logprobs})

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._wrap({}), "choices": [], "usage": usage}


class ChatShape:
    """OpenAI `chat.completion` and `chat.completion.chunk` objects."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _wrap(self, obj: str, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, **choice}], **extra}

    def full(self, text: str, finish_reason: str, usage: dict, logprobs=None) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._wrap("chat.completion", choice, usage=usage)

    def opening(self) -> list[dict]:
        return [self._wrap("chat.completion.chunk", {"delta": {"role": "assistant"}, "finish_reason": None})]

    def piece(self, text: str) -> dict:
        return self._wrap("chat.completion.chunk", {"delta": {"content": text}, "finish_reason": None})

    def closing(self, finish_reason: str, logprobs=None) -> dict:
        # a stream's logprobs come whole in its last chunk (pieces are text, not tokens)
        return self._wrap("chat.completion.chunk", {"delta": {}, "logprobs": logprobs, "finish_reason": finish_reason})

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._wrap("chat.completion.chunk", {}), "choices": [], "usage": usage}
