"""`edgekv serve`'s HTTP side: an OpenAI-compatible chat-completions API over one Model (FastAPI).

POST /v1/chat/completions (JSON, or server-sent events with "stream": true), GET /v1/models, GET /health,
GET /metrics (Prometheus text). Every request checks the API key when one is set. Bad requests get a 400
with the reason in OpenAI's error body; a full queue a 503 with Retry-After; a request past its deadline
a 504. The engine itself runs on the worker's thread (worker.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from edgekv.api import Model
from edgekv.server import protocol
from edgekv.server.conversations import ConversationStore
from edgekv.server.worker import EngineWorker, Failure, Job, Outcome, QueueFull

log = logging.getLogger("edgekv.server")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
RETRY_AFTER_S = 5  # what a refused request is told to wait


@dataclass(frozen=True)
class ServerSettings:
    max_context: int  # prompt plus max_tokens, in tokens
    cache_memory_bytes: int  # conversations' caches kept in memory besides the live one
    cache_disk_bytes: int  # ... and in files, before the least recent are dropped
    api_key: str | None = None
    queue_size: int = 8
    timeout_s: float = 600.0
    default_max_tokens: int = 512


class Metrics:
    def __init__(self, worker: Callable[[], EngineWorker | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgekv_requests", "Chat requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("edgekv_prompt_tokens", "Prompt tokens of answered requests", registry=r)
        self.reused_tokens = Counter("edgekv_reused_prompt_tokens", "Prompt tokens served from a cached conversation",
                                     registry=r)
        self.generated_tokens = Counter("edgekv_generated_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("edgekv_cache_hits", "Requests that reused a cached conversation", registry=r)
        self.decode_rate = Histogram("edgekv_decode_tokens_per_second", "Decode speed per request", registry=r,
                                     buckets=(1, 2, 5, 10, 20, 50, 100))
        self.queue_wait = Histogram("edgekv_queue_wait_seconds", "Time from arrival to the engine", registry=r)
        def of(read: Callable[[EngineWorker], float]) -> Callable[[], float]:  # 0 before start-up
            return lambda: read(worker()) if worker() else 0

        Gauge("edgekv_queue_depth", "Requests waiting or running", registry=r).set_function(of(lambda w: w.depth))
        stored = Gauge("edgekv_stored_conversation_bytes", "KV bytes of the conversations kept besides the live one",
                       ["tier"], registry=r)
        stored.labels("memory").set_function(of(lambda w: w.store.memory_used))
        stored.labels("disk").set_function(of(lambda w: w.store.disk_used))
        Gauge("edgekv_dropped_conversations", "Stored conversations dropped whole past the disk limit",
              registry=r).set_function(of(lambda w: w.store.dropped))


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(protocol.error(message, kind, param), status_code=status, headers=headers)


def create_app(model: Model, settings: ServerSettings) -> FastAPI:
    name = model.name
    worker_box: list[EngineWorker] = []  # set by the lifespan: the engine thread lives while the app serves
    metrics = Metrics(lambda: worker_box[0] if worker_box else None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        store = ConversationStore(model.engine, model.tokenizer, model.engine.session_dir / "conversations",
                                  settings.cache_memory_bytes, settings.cache_disk_bytes)
        worker_box.append(EngineWorker(model, store, settings.queue_size))
        yield
        worker_box[0].shutdown()

    app = FastAPI(title="edgekv", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if settings.api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                metrics.requests.labels("unauthorized").inc()
                return error_response(401, "missing or wrong API key: send the server's key as "
                                           "'Authorization: Bearer KEY'", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, e: RequestValidationError) -> JSONResponse:
        metrics.requests.labels("bad_request").inc()
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unknown field '{where}'", param=where)
        return error_response(400, f"{where or 'body'}: {first['msg']}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "queue_depth": worker_box[0].depth}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "edgekv"}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest, request: Request) -> Response:
        if body.model != name:
            metrics.requests.labels("bad_request").inc()
            return error_response(400, f"unknown model '{body.model}'; this server serves '{name}' (GET /v1/models)",
                                  param="model")
        try:
            stops = body.stops()
            text = model.tokenizer.chat_text(body.template_messages())
        except Exception as e:  # a stop list out of bounds, or a chat template that refuses the messages
            metrics.requests.labels("bad_request").inc()
            return error_response(400, str(e))
        prompt_tokens = len(model.tokenizer.encode_continuation(text))
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if prompt_tokens + max_tokens > settings.max_context:
            metrics.requests.labels("bad_request").inc()
            return error_response(400, f"the prompt's {prompt_tokens} tokens plus max_tokens {max_tokens} pass this "
                                       f"server's context of {settings.max_context} tokens; shorten the conversation "
                                       "or max_tokens, or start the server with a larger --max-context",
                                  param="max_tokens")
        sampling = model.sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        job = Job(f"chatcmpl-{uuid.uuid4().hex[:24]}", text, prompt_tokens, max_tokens, sampling, stops,
                  time.monotonic() + settings.timeout_s, asyncio.get_running_loop())
        try:
            worker_box[0].submit(job)
        except QueueFull:
            metrics.requests.labels("refused").inc()
            return error_response(503, f"the server's queue of {settings.queue_size} requests is full; retry later",
                                  "server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(job, include_usage), media_type="text/event-stream")
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    metrics.requests.labels("cancelled").inc()
                    return Response(status_code=499)
                continue
            if kind == "error":
                return failed(job, value)
            if kind == "done":
                if value.timed_out:
                    return failed(job, timeout())
                finished(job, value, "ok")
                return JSONResponse(protocol.completion(job.id, name, value.reply.text, value.reply.finish_reason,
                                                        usage_of(value)))

    def usage_of(outcome: Outcome) -> dict:
        stats = outcome.reply.stats
        return protocol.usage(stats.prompt_tokens + outcome.reused_tokens, stats.generated_tokens,
                              outcome.reused_tokens)

    def finished(job: Job, outcome: Outcome, status: str) -> None:
        stats = outcome.reply.stats
        metrics.requests.labels(status).inc()
        metrics.prompt_tokens.inc(stats.prompt_tokens + outcome.reused_tokens)
        metrics.reused_tokens.inc(outcome.reused_tokens)
        metrics.generated_tokens.inc(stats.generated_tokens)
        metrics.cache_hits.inc(outcome.reused_tokens > 0)
        metrics.decode_rate.observe(stats.decode_tok_s)
        metrics.queue_wait.observe(outcome.queue_wait_s)
        log.info("%s prompt=%d reused=%d generated=%d decode=%.1f tok/s ttft=%.2f s queue_wait=%.2f s finish=%s",
                 job.id, stats.prompt_tokens + outcome.reused_tokens, outcome.reused_tokens, stats.generated_tokens,
                 stats.decode_tok_s, stats.ttft_s, outcome.queue_wait_s, outcome.reply.finish_reason)

    def timeout() -> Failure:
        return Failure(f"timed out after {settings.timeout_s:g} s", timed_out=True)

    def failed(job: Job, failure: Failure) -> JSONResponse:
        metrics.requests.labels("timeout" if failure.timed_out else "error").inc()
        log.warning("%s failed: %s", job.id, failure.reason)
        return error_response(504 if failure.timed_out else 500, failure.reason,
                              "timeout" if failure.timed_out else "server_error")

    async def stream(job: Job, include_usage: bool):
        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        ended = False
        try:
            yield event(protocol.chunk(job.id, name, {"role": "assistant", "content": ""}))
            while not ended:
                kind, value = await job.events.get()
                if kind == "text":
                    yield event(protocol.chunk(job.id, name, {"content": value}))
                    continue
                ended = True
                if kind == "error" or value.timed_out:
                    failure = value if kind == "error" else timeout()
                    failed(job, failure)
                    yield event(protocol.error(failure.reason, "timeout" if failure.timed_out else "server_error"))
                    continue
                finished(job, value, "ok")
                yield event(protocol.chunk(job.id, name, {}, value.reply.finish_reason))
                if include_usage:
                    yield event(protocol.chunk(job.id, name, {}, usage=usage_of(value)))
            yield "data: [DONE]\n\n"
        finally:
            if not ended:  # the client went away (this task is cancelled): stop at the next token
                job.cancel.set()
                metrics.requests.labels("cancelled").inc()
                log.info("%s cancelled: the client disconnected", job.id)

    return app
