"""An OpenAI-compatible HTTP server for steered generation (`ggsteer serve`).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true` for SSE),
`GET /v1/vectors`, and a chat page at `/` (python/ggsteer/static/). Requests may carry
`"steering": {"happy": 0.15, "honest": -0.1}`: vector names from the registry loaded at start-up,
each with a strength in ggsteer's unit (1.0 = the trained mean gap at each layer). Vectors without a
trained gap (unit "raw": files from repeng or llama.cpp's cvector-generator) are applied with the
strength as a plain coefficient on the stored directions; /v1/vectors reports each vector's unit.

Concurrency: one worker thread owns the model (`BatchWorker`) and keeps one `ContinuousBatch`
open. Handlers put jobs on a queue; between two decodes the worker admits waiting jobs (oldest
first, up to --max-batch sequences whose prompt + max_tokens fit in the context together), so a
request joins the sequences already generating instead of waiting for them to finish, and each
leaves as soon as it is done. Every job has its own controls and sampling settings (max_tokens,
temperature, top_p, seed, stop); a seeded request samples with exactly its own seed. Each sequence
has its own KV sequence id, cleared when it leaves, so no request sees another request's vectors or
cached states. Streaming pieces go from the worker to each request's asyncio queue through
`loop.call_soon_threadsafe`; a stream whose client went away leaves the batch at the next decode.
`finish_reason` and `usage` come from the batch's per-sequence results.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ggsteer.batch_generate import ContinuousBatch, SequenceSampling, SequenceState
from ggsteer.chat import TRANSCRIPT_HEADER
from ggsteer.interventions import make_intervention
from ggsteer.vector import UNIT_RAW, ControlVector

log = logging.getLogger("ggsteer.server")

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 128
MAX_TOKENS_CAP = 2048
MAX_ABS_STRENGTH = 10.0
MAX_STOP_STRINGS = 4
DEFAULT_TEMPERATURE = 0.8
TRANSCRIPT_STOPS = ("\nUser:", "\n\n\n")
# how long the worker waits for more requests before starting a batch that is not full
DEFAULT_BATCH_WAIT_S = 0.02


class ApiError(Exception):
    """A request the server refuses, answered as an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


# -- the vector registry ------------------------------------------------------------------------


@dataclass
class RegisteredVector:
    name: str
    path: Path
    vector: ControlVector

    @property
    def is_raw(self) -> bool:
        return self.vector.unit == UNIT_RAW

    def describe(self) -> dict:
        meta = self.vector.metadata
        return {
            "id": self.name,
            "object": "vector",
            "unit": self.vector.unit,
            "layers": self.vector.layers,
            "recommended_layers": self.vector.recommended_layers,
            "method": meta.get("method"),
            "model_hint": self.vector.model_hint,
            "model_name": meta.get("model_name"),
            "n_embd": self.vector.n_embd,
            "recommended_strength": self.vector.recommended_strength,
        }


class VectorRegistry:
    """The vectors a server may apply, by name (file stem); requests never name a path."""

    def __init__(self, vectors: list[RegisteredVector]):
        self.vectors = {v.name: v for v in vectors}

    @classmethod
    def load(cls, directory, model) -> "VectorRegistry":
        """Every *.gguf in `directory`; raises ValueError listing every file that cannot serve `model`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"--vectors {directory}: not a directory")
        paths = sorted(directory.glob("*.gguf"))
        if not paths:
            raise ValueError(f"--vectors {directory}: no *.gguf control-vector files in it")
        loaded, problems = [], []
        for path in paths:
            try:
                vector = ControlVector.load(path)
                vector.check_model(model)
                loaded.append(RegisteredVector(path.stem, path, vector))
            except Exception as error:  # noqa: BLE001 - every bad file is reported, then start-up stops
                problems.append(f"  {path.name}: {error}")
        if problems:
            raise ValueError(f"refusing vectors that do not fit the model {model.model_name!r}:\n" + "\n".join(problems))
        return cls(loaded)

    @property
    def names(self) -> list[str]:
        return list(self.vectors)

    def describe(self) -> list[dict]:
        return [v.describe() for v in self.vectors.values()]

    def controls(self, steering: dict[str, float], model) -> list:
        """The request's steering as interventions; ApiError(400) for unknown names or bad strengths."""
        controls = []
        for name, strength in steering.items():
            entry = self.vectors.get(name)
            if entry is None:
                known = ", ".join(self.names) or "none"
                raise ApiError(400, f"unknown vector {name!r} in steering; known vectors: {known}", "steering")
            check_strength(name, strength)
            if strength != 0.0:
                controls.append(make_intervention(entry.vector, strength, model.n_layer, model.n_embd, raw=entry.is_raw))
        return controls


def check_strength(name: str, strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ApiError(400, f"steering strength for {name!r} must be a finite number, got {strength!r}", "steering")
    if abs(strength) > MAX_ABS_STRENGTH:
        raise ApiError(400, f"steering strength for {name!r} is {strength}: it must be within +-{MAX_ABS_STRENGTH:g}", "steering")


# -- request bodies -----------------------------------------------------------------------------


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
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


# -- prompts ------------------------------------------------------------------------------------


def chat_prompt(model, messages: list[ChatMessage]) -> tuple[str, list[str], bool]:
    """(prompt, extra stop strings, strip the reply's leading space) for a chat request."""
    history = [m.model_dump() for m in messages]
    template = model.metadata.get("tokenizer.chat_template")
    if template:
        return templated_prompt(model, template, history)
    return transcript_prompt(history), list(TRANSCRIPT_STOPS), True


def templated_prompt(model, template: str, history: list[dict]) -> tuple[str, list[str], bool]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "replace")
    eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "replace")
    try:
        formatted = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=history)
    except Exception as error:  # noqa: BLE001 - templates raise what they like (roles must alternate, ...)
        raise ApiError(400, f"the model's chat template refused these messages: {error}", "messages") from None
    prompt = formatted.prompt
    # the batch decodes tokenize_prompt(prompt), which adds BOS: do not add it twice
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    stops = [formatted.stop] if isinstance(formatted.stop, str) else list(formatted.stop or [])
    return prompt, stops, False


def transcript_prompt(history: list[dict]) -> str:
    """Base models: the same plain "User:/Assistant:" transcript as `ggsteer chat`; a system message replaces the header."""
    system = [m["content"] for m in history if m["role"] == "system"]
    header = "\n".join(system) + "\n\n" if system else TRANSCRIPT_HEADER
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in history if m["role"] != "system"]
    return header + "\n".join(turns) + "\nAssistant:"


# -- jobs and the worker ------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request's generation; the worker reports to it through the event loop's queue."""

    tokens: list[int]  # the prompt, tokenized as the batch decodes it
    controls: list
    sampling: SequenceSampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def send(self, kind: str, value) -> None:
        """Thread-safe: called from the worker thread, delivered on the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


_STOP = object()


class BatchWorker:
    """The one thread that touches the model, running one `ContinuousBatch` for the server's life.

    Between decodes it admits waiting jobs (oldest first) while they fit: at most `max_batch`
    sequences, and prompt + max_tokens of all of them within the context. A job that does not fit
    yet waits, and nothing younger jumps ahead of it. Abandoned streams leave the batch at the
    next decode. When idle, it lingers up to `gather_s` after the first job arrives, so jobs sent
    together have their prompts decoded together.
    """

    def __init__(self, model, max_batch: int, gather_s: float = 0.0):
        self.model = model
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.batch_sizes: list[int] = []  # sequences in each decode, for tests and logs
        self._queue: queue.Queue = queue.Queue()
        self._backlog: deque[Job] = deque()
        self._running: dict[SequenceState, Job] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ggsteer-batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        batch = ContinuousBatch(self.model, self.max_batch)
        try:
            while True:
                self._collect(wait=not self._running)
                if self._stopping:
                    break
                self._drop_cancelled(batch)
                self._admit(batch)
                if self._running:
                    batch = self._step(batch)
        finally:
            for job in [*self._running.values(), *self._backlog]:
                job.send("error", "the server is shutting down")
            batch.close()

    def _collect(self, wait: bool) -> None:
        """Move queued jobs to the backlog; when idle, block for the first and linger for more."""
        if wait and not self._backlog:
            self._take(self._queue.get())
            deadline = time.monotonic() + self.gather_s
            while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                try:
                    self._take(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        while not self._queue.empty():
            self._take(self._queue.get_nowait())

    def _take(self, item) -> None:
        if item is _STOP:
            self._stopping = True
        else:
            self._backlog.append(item)

    def _drop_cancelled(self, batch: ContinuousBatch) -> None:
        self._backlog = deque(job for job in self._backlog if not job.cancelled)
        for state, job in list(self._running.items()):
            if job.cancelled:
                batch.remove(state)
                del self._running[state]

    def _admit(self, batch: ContinuousBatch) -> None:
        while self._backlog and batch.fits(len(self._backlog[0].tokens), self._backlog[0].sampling.max_tokens):
            job = self._backlog.popleft()
            state = batch.add(job.tokens, job.controls, job.sampling,
                              on_piece=lambda piece, job=job: job.send("piece", piece))
            self._running[state] = job

    def _step(self, batch: ContinuousBatch) -> ContinuousBatch:
        """One decode; a failure fails the running jobs (not the server) and starts a fresh batch."""
        self.batch_sizes.append(len(self._running))
        try:
            finished = batch.step()
        except Exception as error:  # noqa: BLE001
            log.exception("a decode of %d sequences failed", len(self._running))
            for job in self._running.values():
                job.send("error", f"generation failed: {error}")
            self._running.clear()
            batch.close()
            return ContinuousBatch(self.model, self.max_batch)
        for state in finished:
            self._running.pop(state).send("done", state.result())
        return batch


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


# -- the app ------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_batch: int = 8
    max_tokens_cap: int = MAX_TOKENS_CAP
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S


class SteeringServer:
    """Turns validated requests into jobs for the worker and their results into OpenAI responses."""

    def __init__(self, model, registry: VectorRegistry, config: ServerConfig):
        self.model = model
        self.registry = registry
        self.config = config
        self.worker = BatchWorker(model, config.max_batch, config.batch_wait_s)
        self.model_id = Path(model.model_path).stem

    def sampling(self, request: GenerationRequest, extra_stops: list[str]) -> SequenceSampling:
        max_tokens = min(request.max_tokens or DEFAULT_MAX_TOKENS, self.config.max_tokens_cap)
        stops = tuple(dict.fromkeys(request.stop_strings() + extra_stops))
        return SequenceSampling(max_tokens, request.temperature, request.top_p, request.seed, stops)

    def new_job(self, request: GenerationRequest, prompt: str, extra_stops: list[str]) -> Job:
        controls = self.registry.controls(request.steering, self.model)
        sampling = self.sampling(request, extra_stops)
        tokens = self.model.tokenize_prompt(prompt)
        if len(tokens) + sampling.max_tokens > self.model.n_ctx():
            raise ApiError(400, f"the prompt ({len(tokens)} tokens) plus max_tokens ({sampling.max_tokens}) "
                                f"exceeds the context ({self.model.n_ctx()} tokens)", "max_tokens")
        return Job(tokens, controls, sampling, asyncio.get_running_loop())

    async def respond(self, job: Job, shape: "CompletionShape | ChatShape", text: VisibleText, stream: bool):
        """Queue the job; answer with SSE events as it generates, or with one object when it is done."""
        self.worker.submit(job)
        if stream:
            return StreamingResponse(self.sse_events(job, shape, text), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await wait_for_result(job)
        return shape.full(text.visible(result.text), result.finish_reason, usage(result))

    async def sse_events(self, job: Job, shape, text: VisibleText):
        try:
            for chunk in shape.opening():
                yield sse(chunk)
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    if new := text.add(value):
                        yield sse(shape.piece(new))
                elif kind == "done":
                    if rest := text.finish(value.text):
                        yield sse(shape.piece(rest))
                    yield sse(shape.closing(value.finish_reason))
                    break
                else:
                    yield sse({"error": {"message": value, "type": "server_error", "code": 500}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # a client gone before its batch started is skipped



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

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        return self._wrap({"text": text, "finish_reason": finish_reason}, usage=usage)

    def opening(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return self._wrap({"text": text, "finish_reason": None})

    def closing(self, finish_reason: str) -> dict:
        return self._wrap({"text": "", "finish_reason": finish_reason})


class ChatShape:
    """OpenAI `chat.completion` and `chat.completion.chunk` objects."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _wrap(self, obj: str, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id,
                "choices": [{"index": 0, **choice}], **extra}

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return self._wrap("chat.completion", {"message": message, "finish_reason": finish_reason}, usage=usage)

    def opening(self) -> list[dict]:
        return [self._wrap("chat.completion.chunk", {"delta": {"role": "assistant"}, "finish_reason": None})]

    def piece(self, text: str) -> dict:
        return self._wrap("chat.completion.chunk", {"delta": {"content": text}, "finish_reason": None})

    def closing(self, finish_reason: str) -> dict:
        return self._wrap("chat.completion.chunk", {"delta": {}, "finish_reason": finish_reason})


def create_app(model, registry: VectorRegistry, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the worker thread that owns `model`."""
    config = config or ServerConfig()
    if not 1 <= config.max_batch <= model.n_seq_max:
        raise ValueError(f"max_batch={config.max_batch} must be between 1 and the model's n_seq_max={model.n_seq_max}")
    server = SteeringServer(model, registry, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="ggsteer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.include_router(api_routes(server))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html")

    return app


def api_error_handler(request: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.message, error.param)


def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path, exc_info=error)
    return error_response(500, f"internal error: {type(error).__name__}")


def api_routes(server: SteeringServer) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_checker(server.config.api_key))])

    @router.get("/vectors")
    def list_vectors():
        return {"object": "list", "data": server.registry.describe()}

    @router.get("/models")
    def list_models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "owned_by": "ggsteer"}]}

    @router.post("/completions")
    async def completions(request: Request):
        body = parse_request(CompletionRequest, await read_json_body(request))
        job = server.new_job(body, body.prompt_text(), [])
        text = VisibleText(list(job.sampling.stop), strip_leading=False)
        return await server.respond(job, CompletionShape(server.model_id), text, body.stream)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(ChatRequest, await read_json_body(request))
        prompt, extra_stops, strip_leading = chat_prompt(server.model, body.messages)
        job = server.new_job(body, prompt, extra_stops)
        text = VisibleText(list(job.sampling.stop), strip_leading)
        return await server.respond(job, ChatShape(server.model_id), text, body.stream)

    return router


def api_key_checker(api_key: str | None):
    """A dependency answering 401 unless the request carries `Authorization: Bearer <api_key>`."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check
