"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI; run with uvicorn by `seekformer serve`).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with `"stream": true` as
server-sent events, ending with a usage chunk and `data: [DONE]`), GET /v1/models, GET /health,
GET /metrics (Prometheus text). With an API key, /v1/* needs `Authorization: Bearer KEY`.

The HTTP layer only validates, tokenises and streams; the engine does the rest on its own thread.
Every error a client can cause is a 4xx with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`; a client that disconnects cancels its request,
which frees its sequences and cache blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import ChoiceOutput, Delta, Engine, RequestHandle, TokenLogprob, collect
from .errors import QueueFull, RequestError
from .protocol import ChatRequest, CompletionRequest


class _Unauthorized(Exception):
    """No or a wrong API key (HTTP 401)."""


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _validation_param(error: dict) -> str | None:
    """The request field a pydantic error points at ("messages.0.role"), None for the body itself."""
    loc = [str(x) for x in error.get("loc", ()) if x != "body"]
    # drop the type names pydantic adds inside unions ("prompt.str", "prompt.list[int]")
    loc = [x for x in loc if not (x[:1].isalpha() and ("[" in x or x in {"str", "int", "float", "bool"}))]
    return ".".join(loc) or None


class _Server:
    def __init__(self, engine: Engine, model_name: str, api_key: str | None) -> None:
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.created = int(time.time())
        self.tokenizer = engine.tokenizer

    # ------------------------------------------------------------------ shared steps
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise RequestError("model", f"the model {name!r} does not exist; this server serves "
                               f"{self.model_name!r}")

    def max_tokens(self, asked: int | None, prompt_len: int) -> int:
        """The request's max_tokens, or (unset) all the context the prompt leaves."""
        if asked is not None:
            return asked
        return max(min(self.engine.context, self.engine.capacity) - prompt_len, 1)

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)

    def submit(self, prompts: list[list[int]], sampling_of, prompt_field: str) -> list[RequestHandle]:
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                try:
                    handles.append(self.engine.submit(ids, sampling_of(len(ids)), loop=loop))
                except RequestError as exc:
                    if exc.field == "prompt":
                        raise RequestError(prompt_field, exc.message) from exc
                    raise
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    # ------------------------------------------------------------------ logprobs formats
    def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        tokens = [self.token_text(e.token) for e in entries]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._top_by_text(e.top) for e in entries],
                "text_offset": offsets}

    def _top_by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """OpenAI keys top log-probs by token text; of tokens with the same text the likelier one stays."""
        out: dict[str, float] = {}
        for token, lp in top:
            out.setdefault(self.token_text(token), lp)
        return out

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def item(token: int, lp: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}


async def _merged(handles: list[RequestHandle], n: int) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several requests as they come, with each choice's index over all prompts."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        async for delta in handle:
            await queue.put((i * n + delta.choice, delta))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    remaining = len(handles) * n
    try:
        while remaining:
            index, delta = await queue.get()
            if delta.finish_reason is not None:
                remaining -= 1
            yield index, delta
    finally:
        for t in tasks:
            t.cancel()


async def _watch_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    """Cancel the requests when the client goes away (non-streaming responses)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for h in handles:
                h.cancel()
            return


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine` as `model_name`; starts and stops the engine's thread."""
    server = _Server(engine, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    def authenticate(request: Request) -> None:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise _Unauthorized

    app = FastAPI(title="seekformer", lifespan=lifespan)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized):
        return error_response(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                              "authentication_error", code="invalid_api_key")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('ctx', {}).get('error', 'invalid')}")
        param = _validation_param(first)
        message = "; ".join(f"{_validation_param(e) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return error_response(400, message, param=param)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        status, code = (404, "model_not_found") if exc.field == "model" else (400, None)
        return error_response(status, str(exc), param=exc.field, code=code)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error_response(429, str(exc), "rate_limit_error", code="queue_full")

    @app.get("/health")
    async def health():
        if not engine.running_in_background:
            return error_response(503, "the engine thread is not running", "server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "seekformer", "max_model_len": engine.context}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        if server.tokenizer is None and isinstance(body.prompt, str):
            raise RequestError("prompt", "this server has no tokenizer: send token ids")
        prompts = body.prompts(server.tokenizer)
        handles = server.submit(prompts, lambda n: body.sampling(server.max_tokens(body.max_tokens, n),
                                                                 body.logprobs), "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(p) for p in prompts) * body.n
        total = len(prompts) * body.n

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": choices}
            if usage is not None or not body.stream:
                out["usage"] = usage
            return out

        def choice(index: int, text: str, entries, offset: int, finish: str | None) -> dict:
            lp = None if body.logprobs is None else server.completion_logprobs(entries or [], offset)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}

        if body.stream:
            async def events():
                offsets, completion = [0] * total, 0
                try:
                    async for index, delta in _merged(handles, body.n):
                        completion += len(delta.token_ids)
                        if delta.finish_reason == "error":
                            yield _sse({"error": {"message": delta.error, "type": "server_error",
                                                  "param": None, "code": None}})
                        if delta.text or delta.finish_reason is not None or body.logprobs is not None:
                            yield _sse(chunk([choice(index, delta.text, delta.logprobs, offsets[index],
                                                     _finish(delta))]))
                        offsets[index] += len(delta.text)
                    if body.include_usage:
                        yield _sse(chunk([], _usage(prompt_tokens, completion)))
                    yield "data: [DONE]\n\n"
                finally:
                    for h in handles:
                        h.cancel()
            return StreamingResponse(events(), media_type="text/event-stream")

        choices = await _gather(request, handles, body.n)
        return chunk([choice(i, c.text, c.logprobs, 0, _finish(c)) for i, c in enumerate(choices)],
                     _usage(prompt_tokens, sum(len(c.token_ids) for c in choices)))

    @v1.post("/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        server.check_model(body.model)
        if server.tokenizer is None:
            raise RequestError("messages", "this server has no tokenizer for the chat template")
        ids = body.prompt_ids(server.tokenizer)
        logprobs = body.logprobs_count()
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        try:
            handles = server.submit([ids], lambda n: body.sampling(server.max_tokens(asked, n), logprobs),
                                    "messages")
        except RequestError as exc:
            raise (RequestError(field, exc.message) if exc.field == "max_tokens" else exc) from None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = len(ids) * body.n

        def chunk(choices: list[dict], usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if body.stream:
            async def events():
                completion = 0
                try:
                    for i in range(body.n):
                        yield _sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]))
                    async for index, delta in _merged(handles, body.n):
                        completion += len(delta.token_ids)
                        if delta.finish_reason == "error":
                            yield _sse({"error": {"message": delta.error, "type": "server_error",
                                                  "param": None, "code": None}})
                        if not (delta.text or delta.finish_reason is not None or logprobs is not None):
                            continue  # text held back (part of a character, or maybe a stop string)
                        lp = server.chat_logprobs(delta.logprobs or []) if logprobs is not None else None
                        content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
                        yield _sse(chunk([{"index": index, "delta": content, "logprobs": lp,
                                           "finish_reason": _finish(delta)}]))
                    if body.include_usage:
                        yield _sse(chunk([], _usage(prompt_tokens, completion)))
                    yield "data: [DONE]\n\n"
                finally:
                    for h in handles:
                        h.cancel()
            return StreamingResponse(events(), media_type="text/event-stream")

        choices = await _gather(request, handles, body.n)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": server.chat_logprobs(c.logprobs or []) if logprobs is not None else None,
                             "finish_reason": _finish(c)} for i, c in enumerate(choices)],
                "usage": _usage(prompt_tokens, sum(len(c.token_ids) for c in choices))}

    app.include_router(v1)
    return app


async def _gather(request: Request, handles: list[RequestHandle], n: int) -> list[ChoiceOutput]:
    """Every choice of every handle, cancelling them all if the client disconnects first."""
    choices = [ChoiceOutput(i, logprobs=[]) for i in range(len(handles) * n)]
    watcher = asyncio.create_task(_watch_disconnect(request, handles))
    try:
        async for index, delta in _merged(handles, n):
            collect(choices[index], delta)
    finally:
        watcher.cancel()
        for h in handles:
            h.cancel()
    failed = next((c for c in choices if c.finish_reason == "error"), None)
    if failed is not None:
        raise RuntimeError(f"generation failed: {failed.error}")
    return choices


def _finish(item) -> str | None:
    """OpenAI's finish reasons: an aborted or failed sequence reports none of its own."""
    return item.finish_reason if item.finish_reason in ("stop", "length") else None


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
