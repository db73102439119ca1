"""An OpenAI-compatible HTTP server for steered generation (`ggsteer serve`).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `"stream": true` for SSE),
`GET /v1/vectors`, and a chat page at `/` (python/ggsteer/serve/static/). Requests may carry
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
`loop.call_soon_threadsafe`; a request whose client went away (streaming or not) leaves the batch
at the next decode. `finish_reason` and `usage` come from the batch's per-sequence results.

Faults and load: at most --max-queue requests wait (429 with Retry-After beyond), the worker
survives failures (worker.py; 503 while it cannot run), `/health` and `/metrics` (Prometheus text)
tell an operator what it does, and guard.py refuses foreign Host names and non-JSON bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ggsteer.chat_format import ChatTemplateError, chat_prompt
from ggsteer.generation import SequenceSampling
from ggsteer.runtime.grammar import check_grammar
from ggsteer.serve.defaults import DefaultSteering
from ggsteer.serve.errors import ApiError, error_response, http_error_handler, validation_error_handler
from ggsteer.serve.guard import LOOPBACK_HOSTS, RequestGuard, api_key_matches
from ggsteer.serve.metrics import ServerMetrics, render
from ggsteer.serve.registry import VectorRegistry
from ggsteer.serve.responses import (
    ChatShape,
    CompletionShape,
    VisibleText,
    chat_logprobs,
    completion_logprobs,
    sse,
    usage,
)
from ggsteer.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    parse_request,
    read_json_body,
)
from ggsteer.serve.settings import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_CAP,
    MAX_VECTOR_FILE_BYTES,
    STATIC_DIR,
)
from ggsteer.serve.steering_routes import steering_routes
from ggsteer.serve.vector_routes import vector_routes
from ggsteer.serve.vector_store import VectorStore
from ggsteer.serve.worker import BatchWorker, Job, QueueFull, WorkerUnavailable

log = logging.getLogger("ggsteer.server")

# -- the app ------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    max_tokens_cap: int = MAX_TOKENS_CAP
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting for the batch at most (more get 429)
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host names accepted ("*": any)
    max_vector_file_bytes: int = MAX_VECTOR_FILE_BYTES


class SteeringServer:
    """Turns validated requests into jobs for the worker and their results into OpenAI responses."""

    def __init__(self, model, registry: VectorRegistry, config: ServerConfig):
        self.model = model
        self.registry = registry
        self.config = config
        self.metrics = ServerMetrics()
        self.worker = BatchWorker(model, config.max_batch, config.batch_wait_s, config.max_queue, self.metrics)
        self.model_id = Path(model.model_path).stem
        self.created = int(time.time())
        self.defaults = DefaultSteering(registry, model)

    def sampling(self, request: GenerationRequest, extra_stops: list[str]) -> SequenceSampling:
        max_tokens = min(request.completion_limit() or DEFAULT_MAX_TOKENS, self.config.max_tokens_cap)
        stops = tuple(dict.fromkeys(request.stop_strings() + extra_stops))
        return SequenceSampling(max_tokens, request.temperature, request.top_p, request.seed, stops,
                                request.presence_penalty, request.frequency_penalty,
                                request.checked_logit_bias(self.model.n_vocab()), request.n_logprobs(),
                                checked_grammar(self.model, request.grammar()), request.top_k, request.min_p,
                                request.repeat_penalty, request.repeat_last_n)

    async def new_job(self, request: GenerationRequest, prompt: str, extra_stops: list[str]) -> Job:
        steering = self.defaults.spec() if request.steering is None else request.steering  # {} opts out
        controls = self.registry.controls(steering, self.model)
        sampling = self.sampling(request, extra_stops)
        # a long prompt takes a while to tokenize: the event loop keeps serving meanwhile
        tokens = await asyncio.to_thread(self.model.tokenize_prompt, prompt)
        if len(tokens) + sampling.max_tokens > self.model.n_ctx():
            raise ApiError(400, f"the prompt ({len(tokens)} tokens) plus max_tokens ({sampling.max_tokens}) "
                                f"exceeds the context ({self.model.n_ctx()} tokens)", "max_tokens")
        job = Job(tokens, controls, sampling, asyncio.get_running_loop())
        job.vector_names = steered_vector_names(steering)
        return job

    async def respond(self, job: Job, shape: "CompletionShape | ChatShape", text: VisibleText,
                      body: GenerationRequest, request: Request):
        """Queue the job; answer with SSE events as it generates, or with one object when it is done."""
        job.stream = body.stream
        self.worker.submit(job)  # QueueFull: 429, WorkerUnavailable: 503
        self.metrics.count_vectors(job.vector_names)
        if body.stream:
            return StreamingResponse(self.sse_events(job, shape, text, body.wants_usage_chunk()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await result_unless_disconnected(job, request)
        return shape.full(text.visible(result.text), result.finish_reason, usage(result), self.logprobs(shape, result))

    def logprobs(self, shape, result):
        convert = chat_logprobs if isinstance(shape, ChatShape) else completion_logprobs
        return convert(self.model, result.logprobs)

    async def sse_events(self, job: Job, shape, text: VisibleText, usage_chunk: bool = False):
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
                    yield sse(shape.closing(value.finish_reason, self.logprobs(shape, value)))
                    if usage_chunk:
                        yield sse(shape.usage_chunk(usage(value)))
                    break
                else:
                    yield sse({"error": {"message": value, "type": "server_error", "code": job.error_status}})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client gone before its batch started is skipped


def steered_vector_names(steering: dict) -> list[str]:
    """The vectors a request steers with (for /metrics): those not at strength 0."""
    return [name for name, spec in steering.items()
            if (spec.get("strength", 1) if isinstance(spec, dict) else spec) != 0]


async def result_unless_disconnected(job: Job, request: Request):
    """The job's result; if the client disconnects first, the job is cancelled (it leaves the batch at
    the next decode) and nobody is answered."""
    result = asyncio.ensure_future(next_outcome(job))
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait([result, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        abandoned = not result.done()
        if abandoned:
            job.cancel()
            result.cancel()
    if abandoned:
        raise ClientGone()
    kind, value = result.result()
    if kind == "error":
        raise ApiError(job.error_status, value)
    return value


async def next_outcome(job: Job) -> tuple[str, object]:
    while True:
        kind, value = await job.events.get()
        if kind != "piece":
            return kind, value


async def wait_for_disconnect(request: Request) -> None:
    # the body has been read, so the next ASGI message is the disconnect (uvicorn sends it then)
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client of a non-streaming request went away before its result."""


def create_app(model, registry: VectorRegistry, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the worker thread that owns `model`."""
    config = config or ServerConfig()
    if not 1 <= config.max_batch <= model.n_seq_max:
        raise ValueError(f"max_batch={config.max_batch} must be between 1 and the model's n_seq_max={model.n_seq_max}")
    server = SteeringServer(model, registry, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ARG001 - FastAPI's lifespan signature
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="ggsteer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)  # 404, 405 in OpenAI's shape
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # "?overwrite=2": 400, not 422
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_exception_handler(QueueFull, busy_handler)
    app.add_exception_handler(WorkerUnavailable, busy_handler)
    app.add_exception_handler(ClientGone, client_gone_handler)
    app.add_exception_handler(ClientDisconnect, client_gone_handler)  # gone while its body was read
    app.add_middleware(RequestGuard, allowed_hosts=config.allowed_hosts, api_key=config.api_key)
    app.include_router(api_routes(server))
    app.include_router(operator_routes(server))
    protected = [Depends(api_key_checker(config.api_key))]
    if registry.directory is not None:
        store = VectorStore(registry, model, server.defaults, config.max_vector_file_bytes)
        app.include_router(vector_routes(store, protected))
        app.include_router(steering_routes(server.defaults, store, protected))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html")

    return app


def checked_grammar(model, grammar: str | None) -> str | None:
    """Refuse (400) a grammar llama.cpp cannot parse here, not in the worker."""
    if grammar is not None:
        try:
            check_grammar(model, grammar)
        except ValueError as error:
            raise ApiError(400, f"response_format: {error}", "response_format") from None
    return grammar


def api_error_handler(request: Request, error: ApiError) -> JSONResponse:  # noqa: ARG001 - Starlette's handler signature
    response = error_response(error.status, error.message, error.param)
    if error.status == 503:  # the worker lost its model (e.g. an RPC worker): worth retrying
        response.headers["Retry-After"] = "1"
    return response


def unexpected_error_handler(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path, exc_info=error)
    return error_response(500, f"internal error: {type(error).__name__}")


def busy_handler(request: Request, error: Exception) -> JSONResponse:  # noqa: ARG001 - Starlette's handler signature
    """429 when the queue is full, 503 while the worker restarts; both say when to try again."""
    response = error_response(429 if isinstance(error, QueueFull) else 503, str(error))
    response.headers["Retry-After"] = "1"
    return response


def client_gone_handler(request: Request, error: Exception) -> JSONResponse:  # noqa: ARG001 - Starlette's handler signature
    return error_response(499, "the client closed the connection before the reply")  # read by nobody


def operator_routes(server: SteeringServer) -> APIRouter:
    """/health (public, for load balancers) and /metrics (Prometheus text; keyed like /v1)."""
    router = APIRouter()

    @router.get("/health")
    def health():
        server.worker.ensure_running()
        if server.worker.available and not server.model.closed:
            return {"status": "ok"}
        return error_response(503, server.worker.lost or "the generation worker is not running")

    @router.get("/metrics", dependencies=[Depends(api_key_checker(server.config.api_key))])
    def metrics():
        worker = server.worker
        text = render(server.metrics, worker.processing, worker.queued, worker.available, server.registry.names)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return router


def api_routes(server: SteeringServer) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_checker(server.config.api_key))])

    @router.get("/vectors")
    def list_vectors():
        return {"object": "list", "data": server.registry.describe()}

    def model_object() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "ggsteer"}

    @router.get("/models")
    def list_models():
        return {"object": "list", "data": [model_object()]}

    @router.get("/models/{model_id:path}")
    def get_model(model_id: str):
        if model_id != server.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server has {server.model_id!r}", "model")
        return model_object()

    @router.post("/completions")
    async def completions(request: Request):
        body = parse_request(CompletionRequest, await read_json_body(request))
        job = await server.new_job(body, body.prompt_text(), [])
        text = VisibleText(list(job.sampling.stop), strip_leading=False)
        return await server.respond(job, CompletionShape(server.model_id), text, body, request)

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(ChatRequest, await read_json_body(request))
        try:
            prompt = chat_prompt(server.model, [m.as_prompt_message() for m in body.messages])
        except ChatTemplateError as error:
            raise ApiError(400, str(error), "messages") from None
        job = await server.new_job(body, prompt.text, list(prompt.stops))
        text = VisibleText(list(job.sampling.stop), prompt.strip_leading)
        return await server.respond(job, ChatShape(server.model_id), text, body, request)

    return router


def api_key_checker(api_key: str | None):
    """A dependency answering 401 unless the request carries `Authorization: Bearer <api_key>`."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        if not api_key_matches(request.headers.get("authorization", ""), api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check
