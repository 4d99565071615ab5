"""The OpenAI-compatible HTTP front of the engine (FastAPI; uvicorn runs it).

Endpoints: /v1/completions and /v1/chat/completions (streamed as server-sent events or not),
/v1/models, /health, /metrics (Prometheus). Bad requests get HTTP 400 with an OpenAI-style error
body naming the problem; a full queue gets 429. A request's tokens come from the engine thread
through `loop.call_soon_threadsafe` into an asyncio queue; a client that goes away aborts its
request, which frees its cache at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..errors import KvshrinkError
from .engine import Engine, QueueFull, Request, Sampling

DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatBody(_Body):
    messages: list[dict]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def create_app(engine: Engine, tokenizer, model_name: str, metrics=None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="kvshrink serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        loc = [str(p) for p in first.get("loc", ())[1:2]]  # the field, without pydantic's union branch
        where = loc[0] if loc else None
        return error_response(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}",
                              param=where)

    @app.exception_handler(BadRequest)
    async def bad(request, exc: BadRequest):
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.get("/health")
    async def health():
        running, waiting = engine.counts()
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.get("/metrics")
    async def metrics_endpoint():
        if metrics is None:
            return Response(status_code=404)
        metrics.refresh(engine)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvshrink"}]}

    def sampling(body: _Body) -> Sampling:
        if body.model is not None and body.model != model_name:
            raise BadRequest(f"unknown model {body.model!r}; this server serves {model_name!r}", "model")
        if body.n != 1:
            raise BadRequest(f"n={body.n} is not supported; use n=1", "n")
        limit = engine.max_context or 1 << 20
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = 16 if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise BadRequest(f"max_tokens must be between 1 and {limit}, got {max_tokens}", "max_tokens")
        if not 0.0 <= body.temperature <= 2.0:
            raise BadRequest(f"temperature must be between 0 and 2, got {body.temperature}", "temperature")
        if not 0.0 < body.top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {body.top_p}", "top_p")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise BadRequest("stop takes up to 4 non-empty strings", "stop")
        return Sampling(max_tokens, body.temperature, body.top_p, tuple(stop), body.seed)

    def submit(ids: list, params: Sampling):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind, payload):  # on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
                pass

        req = Request(list(ids), params, emit)
        req.id = uuid.uuid4().hex[:24]
        try:
            engine.submit(req)
        except QueueFull as err:
            if metrics is not None:
                metrics.rejected.inc()
            raise BadRequest(str(err), status=429, kind="rate_limit_exceeded") from None
        except KvshrinkError as err:
            raise BadRequest(str(err), "prompt") from None
        return req, queue

    async def collect(request: HttpRequest, req: Request, queue: asyncio.Queue) -> str:
        parts = []
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), DISCONNECT_POLL)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.abort(req.id)
                    raise BadRequest("client disconnected", status=499)
                continue
            if kind == "text":
                parts.append(payload)
            elif kind == "error":
                raise BadRequest(payload, status=503, kind="server_error")
            else:
                return "".join(parts)

    def usage(req: Request) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.out),
                "total_tokens": len(req.prompt) + len(req.out)}

    def stream(req: Request, queue: asyncio.Queue, chunk, include_usage: bool):
        async def events():
            done = False
            try:
                first = chunk(None, None, True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    kind, payload = await queue.get()
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(payload, None, False))}\n\n"
                    elif kind == "error":
                        done = True
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        done = True
                        yield f"data: {json.dumps(chunk(None, payload, False))}\n\n"
                        if include_usage:
                            last = chunk(None, None, False)
                            last["choices"], last["usage"] = [], usage(req)
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away mid-stream: free its cache now
                    engine.abort(req.id)
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HttpRequest):
        params = sampling(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("prompt must be one string (batches of prompts: one request each)", "prompt")
            prompt = prompt[0]
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if not ids:
            raise BadRequest("prompt is empty", "prompt")
        req, queue = submit(ids, params)
        rid, now = f"cmpl-{req.id}", int(time.time())

        def chunk(text, finish, opening):
            if opening:
                return None
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return stream(req, queue, chunk, bool((body.stream_options or {}).get("include_usage")))
        text = await collect(request, req, queue)
        return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish}],
                "usage": usage(req)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HttpRequest):
        params = sampling(body)
        if not body.messages:
            raise BadRequest("messages must not be empty", "messages")
        for i, m in enumerate(body.messages):
            if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise BadRequest(f"messages[{i}] needs a role (system, user or assistant) and a string content",
                                 "messages")
        if not tokenizer.chat_template:
            raise BadRequest(f"{model_name} has no chat template; use /v1/completions", "messages")
        ids = tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        req, queue = submit(list(ids), params)
        rid, now = f"chatcmpl-{req.id}", int(time.time())

        def chunk(text, finish, opening):
            delta = {"role": "assistant", "content": ""} if opening else ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return stream(req, queue, chunk, bool((body.stream_options or {}).get("include_usage")))
        text = await collect(request, req, queue)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": req.finish}],
                "usage": usage(req)}

    return app
