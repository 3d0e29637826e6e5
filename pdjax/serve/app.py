"""The HTTP layer: a thin FastAPI app over an `Engine` (vLLM's layout: protocol models, routes, error bodies).

FastAPI + uvicorn + pydantic because the OpenAI protocol is a set of JSON
schemas: as pydantic models (`pdjax.serve.protocol`) the request validation,
the 400 error for a field of the wrong type and the JSON responses come from
well-kept libraries (the stack vLLM and SGLang serve with), and no HTTP is
parsed here. The engine runs on its own thread; a request's handler awaits the
updates the engine posts to its asyncio queue after each chunk. API keys, request
ids and the access log are one middleware (`pdjax.serve.access`); GET /metrics
renders `pdjax.serve.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pdjax.decode.api import DecodeInputError, DecodeResult
from pdjax.model.quantize import weight_format
from pdjax.model.tokenizer import DEFAULT_SYSTEM_PROMPT
from pdjax.serve.access import AccessMiddleware, KeyCheck, RequestRecord, request_record
from pdjax.serve.engine import Engine, EngineStopped, QueueFull, Ticket, Update
from pdjax.serve.metrics import CONTENT_TYPE, ServerMetrics
from pdjax.serve.protocol import ChatCompletionRequest, completion_id, error_body, now
from pdjax.serve.text import AnswerText


class ServeError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


def prompt_ids(tokenizer: Any, messages: list[Any]) -> list[int]:
    """The chat template over the messages (the CLI's system prompt first when they have none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(400, "this model's tokenizer has no chat template, so chat messages cannot be formatted")
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    if turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def create_app(engine: Engine, tokenizer: Any, *, model_name: str, drain_timeout: float = 30.0,
               api_keys: Sequence[str] = ()) -> FastAPI:
    """The app: POST /v1/chat/completions, GET /v1/models, GET /metrics, GET /health. The engine's thread runs
    for the app's lifespan; at shutdown it serves what was submitted for up to `drain_timeout` seconds. With
    `api_keys`, every path but /health needs ``Authorization: Bearer`` one of them (ValueError on an unusable key).
    """
    keys = KeyCheck(api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, drain_timeout)

    app = FastAPI(title="pdjax", summary="Planned diffusion, OpenAI-compatible", lifespan=lifespan)
    app.state.metrics = metrics = ServerMetrics(engine)
    app.add_middleware(AccessMiddleware, keys=keys, on_end=metrics.request_ended)
    decoder = engine.decoder
    ids = decoder.ids
    weights = weight_format(decoder.forward.params)  # int8 / int4 when quantized, else the float dtype

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        # a union's errors name each member after the field (content.str, content.list[...]): name the field
        common = [str(x) for x in os.path.commonprefix([list(e.get("loc", ())) for e in errors]) if x != "body"]
        where = ".".join(common or loc)
        if first.get("type") == "json_invalid":
            where = ""
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        else:
            message = f"{where}: {first['msg']}" if where else first["msg"]
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Routing's own errors (an unknown path 404, a wrong method 405) as OpenAI error objects too."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ServeError)
    async def served_error(request: Request, exc: ServeError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "mode": engine.config.mode, **engine.stats()}

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "pdjax",
                "max_model_len": engine.config.max_length, "weights": weights}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        record = request_record(request.scope) or RequestRecord("", "POST", request.url.path, time.perf_counter())
        record.stream = body.stream
        if body.model != model_name:
            raise ServeError(404, f"model {body.model!r} is not served here; GET /v1/models lists {model_name!r}",
                             param="model", code="model_not_found")
        try:
            options = body.options()
        except ValueError as e:
            raise ServeError(400, str(e)) from None
        ids_in = prompt_ids(tokenizer, body.messages)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()
        try:
            ticket = engine.submit(ids_in, options, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        except DecodeInputError as e:
            limit = engine.config.max_length
            if len(ids_in) < limit:
                raise ServeError(400, str(e), param="messages") from None
            raise ServeError(400, f"the messages hold {len(ids_in)} tokens; this server's budget (--max_length) "
                             f"is {limit} tokens for prompt and response together", param="messages",
                             code="context_length_exceeded") from None
        except QueueFull as e:
            raise ServeError(429, f"the server is at capacity: {e}; retry later", "rate_limit_error",
                             code="queue_full") from None
        except EngineStopped as e:
            raise ServeError(503, str(e), "service_unavailable") from None
        answer = AnswerText(tokenizer, ids, decoder.eos_id, body.stop_strings())
        reply = _Reply(completion_id(), now(), model_name, len(ids_in), answer, ticket, tokenizer, record)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.stream(updates, usage), media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, ticket, record))
        try:
            last = await reply.collect(updates)
        finally:
            watcher.cancel()
            ticket.cancel()  # a no-op once answered; frees the slot if this handler was cancelled
        if last.error is not None:
            raise ServeError(500, f"decoding failed: {last.error}", "server_error")
        return reply.completion(last)

    return app


async def _watch_disconnect(request: Request, ticket: Ticket, record: RequestRecord) -> None:
    """Cancel the ticket (freeing its slot) once the client has gone: with the body read, the server's next
    message is the disconnect (no polling)."""
    while not ticket.done:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            record.client_left = not ticket.done
            ticket.cancel()
            return


class _Reply:
    """One request's response: the non-streaming completion or the SSE chunks."""

    def __init__(self, rid: str, created: int, model: str, prompt_tokens: int, answer: AnswerText, ticket: Ticket,
                 tokenizer: Any, record: RequestRecord):
        self.id, self.created, self.model = rid, created, model
        self.record = record
        self.prompt_tokens = prompt_tokens
        self.answer = answer
        self.ticket = ticket
        self.tokenizer = tokenizer
        self.tokens: list[int] = []

    async def collect(self, updates: asyncio.Queue[Update]) -> Update:
        """Await updates until the last one; a stop string cancels the request (the last update then says so)."""
        while True:
            update = await updates.get()
            self._read(update)
            if update.last:
                return update

    def _read(self, update: Update) -> None:
        if update.tokens:
            self.record.first_token_now()
        self.tokens.extend(update.tokens)
        if not self.answer.stopped:
            self.answer.feed(update.tokens)
            _ = self.answer.text  # sets `stopped` if a stop string appeared
            if self.answer.stopped:
                self.ticket.cancel()

    def _finish_reason(self, last: Update) -> str:
        if self.answer.stopped:
            return "stop"
        result = last.result
        return "length" if result is not None and result.stats.finish_reason == "length" else "stop"

    def _usage(self, last: Update) -> dict[str, Any]:
        completion = len(last.result.token_ids) if last.result is not None else len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _answered(self, last: Update) -> None:
        """Note the answer's tokens and model calls for the access log and the metrics."""
        r = self.record
        r.prompt_tokens, r.completion_tokens = self.prompt_tokens, self._usage(last)["completion_tokens"]
        r.model_calls = last.result.stats.model_calls if last.result is not None else 0
        r.answered = True

    def _stats(self, result: DecodeResult | None) -> dict[str, Any]:
        """The extra field: model calls, rounds, spans (the decoder's DecodeStats) and the raw response."""
        if result is None:
            return {"raw": self.tokenizer.decode(self.tokens, skip_special_tokens=False)}
        keep = ("model_calls", "prefill_calls", "plan_calls", "denoise_calls", "commit_calls", "rounds", "groups",
                "spans", "span_lengths", "finish_reason", "wall_time_s", "loop_iterations")
        stats = {k: v for k, v in result.stats.to_dict().items() if k in keep}
        stats["raw"] = self.tokenizer.decode(result.token_ids, skip_special_tokens=False)
        return stats

    def completion(self, last: Update) -> dict[str, Any]:
        """The chat.completion object."""
        self._answered(last)
        message = {"role": "assistant", "content": self.answer.text}
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": self._finish_reason(last),
                         "logprobs": None}],
            "usage": self._usage(last),
            "pdjax": self._stats(last.result),
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def stream(self, updates: asyncio.Queue[Update], include_usage: bool) -> AsyncIterator[str]:
        """SSE chunks: the plan as it is written (delta.plan), each group's text once its spans are denoised."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                update = await updates.get()
                self._read(update)
                text, plan = self.answer.delta(final=update.last)
                if text or plan:
                    yield self._chunk({"content": text, **({"plan": plan} if plan else {})})
                if update.last:
                    break
            if update.error is not None:
                yield f"data: {json.dumps(error_body(f'decoding failed: {update.error}', 'server_error'))}\n\n"
            else:
                self._answered(update)
                yield self._chunk({}, self._finish_reason(update))
                if include_usage:
                    usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model, "choices": [], "usage": self._usage(update),
                             "pdjax": self._stats(update.result)}
                    yield f"data: {json.dumps(usage, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.ticket.cancel()  # the client went away (or we are done): free the slot
