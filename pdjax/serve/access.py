"""Who may call the server and what each call did: API keys, request ids, the access log, the request counters.

One pure ASGI middleware (it sees every response, streamed ones included, and
never buffers a body) in front of the routes:
- API keys: every path but /health needs ``Authorization: Bearer KEY``; a key is
  compared with each accepted key in constant time (`hmac.compare_digest` over
  SHA-256 digests, so neither content nor length leaks through timing), and a
  missing or wrong one is a 401 with an OpenAI error object.
- Request ids: the client's ``x-request-id`` if it sent a usable one, else a fresh
  one; every response carries it back, and the access log line names it.
- One access log line per request, and its counters, written just before the last
  byte of the response goes out (so a client that then asks /metrics sees itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence

from starlette.requests import ClientDisconnect

from pdjax.serve.protocol import error_body

ACCESS_LOGGER = "pdjax.serve.access"
OPEN_PATHS = ("/health",)  # a load balancer's probe needs no key
RECORD_KEY = "pdjax.request"  # where a request's record sits in the ASGI scope, for the route to fill in
REQUEST_ID_HEADER = "x-request-id"
# a client's id is echoed and logged only if it is short and plain (no spaces, quotes or control characters)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# RFC 6750's token characters: what a Bearer key may hold
_KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def check_api_key(key: str) -> str:
    """`key` if it can be sent as a Bearer token (non-empty, RFC 6750 token characters); ValueError otherwise."""
    if not key:
        raise ValueError("an API key must not be empty")
    if not _KEY.fullmatch(key):
        raise ValueError("an API key may hold only letters, digits and - . _ ~ + / = (no spaces)")
    return key


class KeyCheck:
    """The accepted API keys (none: every request is let in)."""

    def __init__(self, keys: Sequence[str] = ()):
        self._digests = [hashlib.sha256(check_api_key(k).encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value names an accepted key (each key compared, in constant time)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for digest in self._digests:  # no early exit: the time does not say which key matched
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == "bearer"


@dataclasses.dataclass
class RequestRecord:
    """One request as the access log and the counters see it; the chat route fills in tokens and timings."""

    id: str
    method: str
    path: str
    start: float  # time.perf_counter() when the request arrived
    status: int | None = None  # the HTTP status sent
    client_left: bool = False  # the client went away before the response was complete
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_calls: int = 0
    answered: bool = False  # a chat completion with the decoder's result (tokens and calls are set)
    first_token: float | None = None  # seconds from arrival to the first response token final
    latency: float = 0.0  # seconds from arrival to the end of the response
    ended: bool = False

    def first_token_now(self) -> None:
        """Note the first response token's time (once)."""
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.start

    @property
    def status_label(self) -> int:
        """The status counted: 499 (nginx's "client closed request") when the client left before the end."""
        return 499 if self.client_left else (self.status or 0)

    def log_line(self) -> str:
        """The access log line: logfmt (key=value), one per request."""
        parts = [f"request_id={self.id}", f"method={self.method}", f"path={self.path}",
                 f"status={self.status_label}", f"latency_s={self.latency:.3f}"]
        if self.client_left:
            parts.append(f"sent_status={self.status or 0} client_left=1")
        if self.path == "/v1/chat/completions" and self.status == 200:
            ttft = "-" if self.first_token is None else f"{self.first_token:.3f}"
            parts += [f"stream={int(self.stream)}", f"prompt_tokens={self.prompt_tokens}",
                      f"completion_tokens={self.completion_tokens}", f"model_calls={self.model_calls}",
                      f"ttft_s={ttft}"]
        return " ".join(parts)


def request_record(scope: Scope) -> RequestRecord | None:
    """The record the middleware put in a request's scope (None for an app run without it)."""
    return scope.get(RECORD_KEY)


class AccessMiddleware:
    """API keys, request ids, access log and request counters around an ASGI app (see the module docstring).

    ``on_end`` is called once per request with its ended `RequestRecord` (the metrics' `request_ended`).
    """

    def __init__(self, app: Any, keys: KeyCheck, on_end: Callable[[RequestRecord], None],
                 log: logging.Logger | None = None):
        self.app, self.keys, self.on_end = app, keys, on_end
        self.log = log or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client_id = headers.get(REQUEST_ID_HEADER, "")
        rid = client_id if _CLIENT_ID.fullmatch(client_id) else uuid.uuid4().hex
        record = RequestRecord(rid, scope.get("method", ""), scope.get("path", ""), time.perf_counter())
        scope[RECORD_KEY] = record

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER.encode(), rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self._end(record)  # before the last byte leaves: a client's next request sees this one counted
            await send(message)

        if record.path not in OPEN_PATHS and not self.keys.allows(headers.get("authorization")):
            message = ("a missing or wrong API key: send it as 'Authorization: Bearer KEY' (the server's "
                       "--api-key or PDJAX_API_KEY)")
            await _send_json(traced_send, 401, error_body(message, "invalid_request_error", code="invalid_api_key"),
                             [(b"www-authenticate", b"Bearer")])
            return
        broke = False
        try:
            await self.app(scope, receive, traced_send)
        except Exception as e:
            if record.status is None:  # answer it here, so that even this response names its request id
                await _send_json(traced_send, 500, error_body("internal server error", "server_error"))
            broke = not isinstance(e, (OSError, ClientDisconnect))
            raise
        finally:
            if not record.ended:  # the response did not complete: the client went away, or the app failed
                if record.status is None or broke:
                    record.status = 500  # what uvicorn answers, or a response cut off by a failure
                else:
                    record.client_left = True
                self._end(record)

    def _end(self, record: RequestRecord) -> None:
        if record.ended:
            return
        record.ended = True
        record.latency = time.perf_counter() - record.start
        self.on_end(record)
        self.log.info("%s", record.log_line())


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
