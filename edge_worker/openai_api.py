"""An OpenAI-compatible HTTP API over one ``EdgeEngine``: what ``edgecloud serve`` runs.

The server is a thin adapter. A request becomes token ids and ``GenerationParams``; the engine
runs it on a thread of its own (each a cloud session when the model is split), and its text
comes back to the event loop piece by piece, as server-sent events when the client asked for a
stream. A client that goes away mid-stream cancels its generation at the next step, which closes
its cloud session (the worker frees the cache at once). At most ``max_concurrent`` generations
run at a time; one more is answered 429 with ``Retry-After``. Every error is in OpenAI's shape.

    GET  /v1/models              the one model this server runs
    POST /v1/chat/completions    messages through the tokenizer's chat template
    POST /v1/completions         a raw prompt (text or token ids)
    GET  /health                 liveness, no key needed
    GET  /metrics                Prometheus text
    GET  /                       a chat page on the same API (edge_worker/data/chat.html)
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.errors import EdgeCloudError
from edge_worker.engine import ContextLengthError, EdgeEngine, GenerationParams
from edge_worker.generation import GenerationCancelled, GenerationResult
from edge_worker.metrics import ServerMetrics
from edge_worker.openai_schema import APIError, ChatCompletionRequest, CompletionBase, CompletionRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer adds to the engine's settings."""

    model_name: str | None = None  # the id clients send as "model"; None: the engine's model name
    http_key: str | None = None  # clients send "Authorization: Bearer KEY"; None: no key asked
    # Generations at once; more are answered 429. Each is a thread and, split, a cloud session; on
    # two cores a few keep the CPU busy while the others wait on the network.
    max_concurrent: int = 4
    retry_after_s: int = 1  # what a 429 tells the client to wait


class _Slots:
    """The concurrency bound: taken when a request starts generating, given back once."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.used = 0
        metrics.active.set_function(lambda: self.used)  # the gauge reads the count, never kept twice

    def take(self, retry_after_s: int) -> Callable[[], None]:
        if self.used >= self.limit:
            raise APIError(429, f"the server runs {self.limit} generations at once, all busy; retry shortly",
                           type="rate_limit_error", code="too_many_requests",
                           headers={"Retry-After": str(retry_after_s)})
        self.used += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.used -= 1

        return release


class _Generation:
    """One generation on a thread of the server's pool, read from the event loop as (kind, item)
    events: ("text", piece)..., then ("done", result) or ("error", exception). ``cancel`` ends it
    early."""

    def __init__(self, engine: EdgeEngine, ids: list[int], params: GenerationParams,
                 pool: ThreadPoolExecutor) -> None:
        self.engine, self.ids, self.params = engine, ids, params
        self.cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        # Started at once: a stream's headers wait for its first event (Server.complete).
        pool.submit(self._run)

    def _put(self, kind: str, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, item))
        except RuntimeError:  # the loop is gone: the server stopped
            self.cancel.set()

    def _run(self) -> None:
        try:
            result = self.engine.generate(self.ids, self.params, on_text=lambda t: self._put("text", t),
                                          cancel=self.cancel)
            self._put("done", result)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            self._put("error", exc)

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        try:
            while True:
                kind, item = await self._queue.get()
                yield kind, item
                if kind != "text":
                    return
        finally:
            self.cancel.set()  # a no-op when it ended; else the client went away


class _ClosingStream(StreamingResponse):
    """A stream that gives its slot back however it ends, even before its first byte."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def engine_error(exc: BaseException) -> APIError:
    """The HTTP answer for what a generation raised."""
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EdgeCloudError):  # the cloud could not serve it and the fallback is off
        retry_after_s = getattr(exc, "retry_after_s", 0.0)  # a busy answer's hint, passed on
        headers = {"Retry-After": str(math.ceil(retry_after_s))} if retry_after_s > 0 else None
        return APIError(503, f"the cloud could not serve this request: {exc}", type="service_unavailable",
                        code=getattr(exc, "code", None), headers=headers)
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    log.error("generation failed", exc_info=exc)
    return APIError(500, f"the generation failed: {type(exc).__name__}: {exc}", type="server_error")


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _usage(result: GenerationResult) -> dict[str, int]:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.stop_reason == "length" else "stop"


def _figures(result: GenerationResult) -> dict[str, Any]:
    """Where the answer was computed: an extension field clients ignore (the chat page shows it)."""
    return {"mode": result.mode, "split": result.split, "n_layers": result.n_layers, "splits_used": result.splits_used,
            "cloud_round_trips": result.cloud_round_trips, "retries": result.retries,
            "fallback_at_step": result.fallback_at_step, "ttft_ms": round(result.ttft_ms, 1),
            "ms_per_token": round(result.ms_per_token, 2), "workers_used": result.workers_used}


class _Server:
    def __init__(self, engine: EdgeEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.model = config.model_name or engine.source.name
        self.created = int(time.time())
        self.metrics = ServerMetrics()
        self.slots = _Slots(config.max_concurrent, self.metrics)
        # Threads that outlive their requests: a thread's first torch call builds its OpenMP team,
        # which a new thread per request paid every time. Twice the bound: a cancelled generation
        # may still finish its step after its slot is given back.
        self.pool = ThreadPoolExecutor(max_workers=2 * config.max_concurrent, thread_name_prefix="edgecloud-gen")

    # --- requests -> engine ------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.config.http_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                   self.config.http_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    def check_model(self, body: CompletionBase) -> None:
        if body.model != self.model:
            raise APIError(404, f"model '{body.model}' is not served here; this server runs '{self.model}' "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def prepare(self, body: CompletionBase, ids: list[int], raw_prompt: bool
                ) -> tuple[list[int], GenerationParams]:
        """The prompt as the model will read it (its last ``truncate_prompt_tokens``, or fitted to
        the context when the server runs with ``--truncate-prompt``) and the request's params."""
        limit = self.engine.context_length
        requested = body.limit()
        if body.truncate_prompt_tokens is not None:
            ids = ids[-body.truncate_prompt_tokens:]
        params = body.params(self.engine.defaults, raw_prompt,
                             seed=body.seed if body.seed is not None else secrets.randbelow(2**31))
        if requested is None and limit is not None:  # no max_tokens: the default, within the context
            params = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, limit - len(ids))))
        try:
            ids = self.engine.fit_prompt(ids, params.max_new_tokens, params.truncate_prompt)
        except ContextLengthError as exc:
            message = str(exc).replace("(--truncate-prompt)", "(truncate_prompt_tokens)")
            raise APIError(400, message, param="prompt" if raw_prompt else "messages",
                           code="context_length_exceeded") from None
        # The engine gets the prompt already fitted: usage counts what the model read.
        return ids, replace(params, truncate_prompt=False)

    def prompt_ids(self, body: CompletionRequest) -> list[int]:
        try:
            ids = self.engine.encode(body.prompt, raw=True)  # token ids: checked against the vocabulary
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    async def complete(self, body: CompletionBase, ids: list[int], params: GenerationParams,
                       chat: bool) -> Response:
        release = self.slots.take(self.config.retry_after_s)
        generation = _Generation(self.engine, ids, params, self.pool)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            def close() -> None:
                generation.cancel.set()  # a no-op when it ended; else the stream never ran to its end
                release()

            # The headers wait for the generation's first event: one that fails before any token
            # (a busy or unreachable cloud with the fallback off) is an HTTP error with its status
            # and Retry-After, as the same request unstreamed gets, not a 200 whose stream says so.
            events = generation.events()
            try:
                first = await anext(events)
            except BaseException:
                close()  # the client went away before the first event
                raise
            if first[0] == "error" and not isinstance(first[1], GenerationCancelled):
                close()
                raise engine_error(first[1])
            return _ClosingStream(self.stream(events, first, body, rid, chat), on_close=close)
        try:
            result = await self.finish(generation)
        finally:
            release()
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(result)}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model, "choices": [choice], "usage": _usage(result), "edgecloud": _figures(result),
        })

    async def finish(self, generation: _Generation) -> GenerationResult:
        async for kind, item in generation.events():
            if kind == "done":
                self.metrics.finished(item)
                return item
            if kind == "error":
                raise engine_error(item)
        raise AssertionError("a generation ended without a result or an error")

    async def stream(self, events: AsyncIterator[tuple[str, Any]], first: tuple[str, Any], body: CompletionBase,
                     rid: str, chat: bool) -> AsyncIterator[str]:
        """The stream's events: ``first`` (already read), then the rest of ``events``."""
        created = int(time.time())
        usage_field = {"usage": None} if body.include_usage else {}

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = ({"role": "assistant", "content": ""} if role
                                   else {} if delta is None else {"content": delta})
            else:
                choice["text"] = delta or ""
            return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": self.model, "choices": [choice], **usage_field}

        if chat:
            yield _sse(chunk(None, role=True))
        async def all_events() -> AsyncIterator[tuple[str, Any]]:
            yield first
            if first[0] == "text":
                async for event in events:
                    yield event

        try:
            async for kind, item in all_events():
                if kind == "text":
                    yield _sse(chunk(item))
                elif kind == "done":
                    self.metrics.finished(item)
                    yield _sse({**chunk(None, _finish_reason(item)), "edgecloud": _figures(item)})
                    if body.include_usage:
                        yield _sse({**chunk(None), "choices": [], "usage": _usage(item)})
                else:
                    if isinstance(item, GenerationCancelled):
                        return
                    yield _sse(engine_error(item).body())
            yield _sse("[DONE]")
        except asyncio.CancelledError:
            self.metrics.cancelled.inc()  # the client went away; events() cancelled the generation
            raise


def create_app(engine: EdgeEngine, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving ``engine`` (run it with uvicorn, or test it with httpx)."""
    server = _Server(engine, config or ServerConfig())
    app = FastAPI(title="edgecloud", description="OpenAI-compatible API over split edge-cloud inference",
                  version="0.1.0", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), type="invalid_request_error",
                       code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    app.add_middleware(_CountRequests, metrics=server.metrics)

    page = importlib.resources.files("edge_worker").joinpath("data/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        # The page holds no secret: it asks for the key, and every call it makes is checked.
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model, "generations": server.slots.used,
                "max_concurrent": server.slots.limit}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        server.check_key(request)
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_key(request)
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        server.check_key(request)
        if model_id != server.model:
            raise APIError(404, f"model '{model_id}' is not served here", param="model", code="model_not_found")
        return _model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        server.check_key(request)
        server.check_model(body)
        ids = engine.encode_chat(body.conversation())
        ids, params = server.prepare(body, ids, raw_prompt=False)
        return await server.complete(body, ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.check_key(request)
        server.check_model(body)
        ids = server.prompt_ids(body)
        ids, params = server.prepare(body, ids, raw_prompt=True)
        return await server.complete(body, ids, params, chat=False)

    return app


class _CountRequests:
    """Counts requests by route and status as plain ASGI: Starlette's ``BaseHTTPMiddleware``
    relays every chunk of a stream through a task and a memory stream of its own, on the path of
    each token."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what a request that raised before its response began is counted as

        async def send_counting(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            route = scope.get("route")  # set by the router on this same scope
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()


def _model_card(server: _Server) -> dict[str, Any]:
    return {"id": server.model, "object": "model", "created": server.created, "owned_by": "edgecloud"}


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first problem with a request body, said in one line."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    # pydantic names the member of a union it tried in the location ("content.str"): not a parameter
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and str(p) not in _UNION_TAGS and "[" not in str(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") in ("model_attributes_type", "missing") and not loc:  # no body, or not an object
        return APIError(400, "the body must be a JSON object (Content-Type: application/json)", code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown parameter '{param}'", param=param, code="unknown_parameter")
    if first.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param=param, code="missing_parameter")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"invalid '{param}': {msg}" if param else msg, param=param, code="invalid_value")
