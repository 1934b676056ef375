"""The FastAPI app (imported once server.py has checked the openai extra is there): POST /v1/chat/completions (whole or as server-sent events), GET /v1/models,
GET /health (200 ready, 503 starting or draining), GET /metrics (Prometheus).

A chat request is checked in this order, each refusal an OpenAI error object: the API key (401),
the server's state (503), the body's size (413), its fields (400; FastAPI's own 422s become 400
too), the model's name (404), the look-close settings (400, serve/settings.py: the checks of `run`
and `serve`), a place in the queue (429), the image (400 / 413) and the prompt against the
model's context (400); then the batcher answers it. /health and /metrics need no key (probes and
scrapers); /v1/* does when the server has one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from dataclasses import dataclass, field

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import Ps3EdgeError
from ..serve.settings import LookCloseDefaults, checked_settings
from . import images, protocol
from .batcher import Job, Outcome
from .protocol import ApiError, bad_request

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServerState:
    """What the routes share; server.py fills in the pipeline and batcher and moves `status`
    from starting to ready to draining."""
    model_name: str
    defaults: LookCloseDefaults
    metrics: object
    api_key: str | None = None
    max_image_bytes: int = 0
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    body_limit: int = 0
    status: str = "starting"
    pipeline: object = None
    batcher: object = None
    created: int = field(default_factory=protocol.now)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    @property
    def active(self) -> int:
        """Chat requests admitted whose response is not yet sent whole."""
        with self._lock:
            return self._active


def _route(path: str) -> str:
    return next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")


class MetricsMiddleware:
    """Counts every HTTP request by route and status and times it to its response's last byte."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            route = _route(scope.get("path", ""))
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)


def error_response(error: ApiError) -> JSONResponse:
    headers = {}
    if error.status == 429:
        headers["Retry-After"] = "1"
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def authorize(state: ServerState, request) -> None:
    """Bearer token, compared in constant time; nothing to check without --api-key."""
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", None, "invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "invalid API key", None, "invalid_api_key")


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit} "
                            f"(--max-image-bytes and the base64 around it)", None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (--max-image-bytes and the base64 "
                                f"around it)", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(state: ServerState, conversation, settings, sampling):
    """In a worker thread: the image decoded, the conversation tokenized and checked."""
    image = images.load(conversation.image_url, state.max_image_bytes, state.allow_remote_images,
                        state.remote_timeout_s)
    try:
        with state.tokenizer_lock:
            request = state.pipeline.request(conversation.turns, settings, sampling, conversation.image_message)
    except Ps3EdgeError as e:
        raise bad_request(str(e), "messages") from None
    return image, request


def _sse(body) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ps3edge serve-openai", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = protocol._param([p for p in first.get("loc", ()) if p != "body"])
        return error_response(bad_request(f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                                          param or None))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 405:
            error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", None, "method_not_allowed")
            response = error_response(error)
            response.headers.update(exc.headers or {})
            return response
        if exc.status_code == 404:
            return error_response(ApiError(404, f"no such endpoint: {request.method} {request.url.path}", None,
                                           "not_found"))
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health():
        ready = state.status == "ready"
        return JSONResponse({"status": state.status}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(state, request)
        return {"object": "list", "data": [protocol.model_card(state.model_name, state.created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(state, request)
        if model_id != state.model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves '{state.model_name}'",
                           "model", "model_not_found")
        return protocol.model_card(state.model_name, state.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(state, request)
        if state.status != "ready":
            raise ApiError(503, f"the server is {state.status}; retry on another replica or later", None,
                           f"server_{state.status}")
        parsed = protocol.parse_request(await read_body(request, state.body_limit))
        if parsed.model != state.model_name:
            raise ApiError(404, f"the model '{parsed.model}' does not exist; this server serves '{state.model_name}'",
                           "model", "model_not_found")
        protocol.check_no_ops(parsed)
        sampling = protocol.sampling(parsed)
        stops = protocol.stop_strings(parsed)
        conversation = protocol.conversation(parsed)
        try:
            settings = checked_settings(state.defaults, protocol.look_close_parameters(parsed),
                                        state.pipeline.ps3.geometry)
            state.pipeline.check_context(settings)
        except Ps3EdgeError as e:
            raise bad_request(str(e), protocol.look_close_param(parsed, str(e))) from None
        state.batcher.reserve()
        try:
            image, vila_request = await to_thread.run_sync(_prepare, state, conversation, settings, sampling)
        except BaseException:
            state.batcher.release()
            raise
        state.enter()
        cid, created = protocol.completion_id(), protocol.now()
        loop = asyncio.get_running_loop()
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return _streaming(state, loop, vila_request, image, stops, cid, created, include_usage)
        try:
            outcome = await _whole(state, loop, request, vila_request, image, stops)
        finally:
            state.leave()
        if outcome is None:
            return Response(status_code=499)                 # the client went away; nothing to send
        if outcome.error is not None:
            raise outcome.error
        use = protocol.usage(outcome.prompt_tokens, outcome.completion_tokens)
        return protocol.completion(cid, created, state.model_name, outcome.text, outcome.finish_reason, use)

    return app


def _deliver(loop, future: asyncio.Future, outcome: Outcome) -> None:
    def settle():
        if not future.done():
            future.set_result(outcome)
    loop.call_soon_threadsafe(settle)


async def _whole(state: ServerState, loop, request, vila_request, image, stops) -> Outcome | None:
    """Submit and wait for the whole answer; None when the client went away first (the batcher
    then skips or stops its work)."""
    done: asyncio.Future = loop.create_future()
    job = Job(vila_request, image, stops, emit=lambda piece: None, finish=lambda o: _deliver(loop, done, o))
    state.batcher.submit(job)
    while not done.done():
        await asyncio.wait({done}, timeout=0.5)
        if not done.done() and await request.is_disconnected():
            job.cancelled.set()
            return None
    return done.result()


def _streaming(state: ServerState, loop, vila_request, image, stops, cid: str, created: int,
               include_usage: bool) -> StreamingResponse:
    """Server-sent events: a first chunk with the role, one per piece of text, one with the
    finish reason, optionally one with the usage, then [DONE]. An error after the first chunk
    is sent as an error object in the stream."""
    pieces: asyncio.Queue = asyncio.Queue()
    job = Job(vila_request, image, stops,
              emit=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, ("text", piece)),
              finish=lambda outcome: loop.call_soon_threadsafe(pieces.put_nowait, ("done", outcome)))
    state.batcher.submit(job)
    name = state.model_name

    async def events():
        finished = False
        try:
            yield _sse(protocol.chunk(cid, created, name, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await pieces.get()
                if kind == "text":
                    yield _sse(protocol.chunk(cid, created, name, {"content": value}))
                    continue
                finished = True
                if value.error is not None:
                    yield _sse(value.error.body())
                else:
                    yield _sse(protocol.chunk(cid, created, name, {}, value.finish_reason))
                    if include_usage:
                        yield _sse(protocol.chunk(cid, created, name, None, None,
                                                  protocol.usage(value.prompt_tokens, value.completion_tokens)))
                yield _sse("[DONE]")
                return
        finally:
            if not finished:
                job.cancelled.set()                          # the client went away: stop generating for it
            state.leave()

    return StreamingResponse(events(), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
