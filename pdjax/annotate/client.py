"""A minimal client for OpenAI-compatible chat-completions endpoints (stdlib only).

`POST {base_url}/chat/completions` with a bearer key; works with OpenAI, vLLM,
SGLang, llama.cpp, Ollama and other servers that speak this protocol.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from typing import Mapping, Sequence

DEFAULT_BASE_URL = "https://api.openai.com/v1"


# HTTP statuses worth retrying: the server is busy or failing, not refusing this request.
TRANSIENT_STATUS = frozenset({408, 425, 429})
# HTTP statuses that no retry can fix and that every row would meet: wrong URL, model or key.
FATAL_STATUS = frozenset({401, 402, 403, 404, 405})


class EndpointError(RuntimeError):
    """A request that got no usable answer; `reason` is a short code ('timeout', 'http-503', 'bad-reply', ...).

    ``kind`` says what to do about it: 'transient' (timeouts, connection errors,
    429, 5xx, a garbled reply: retry after a backoff), 'fatal' (401/403/404:
    the endpoint settings are wrong, stop the run) or 'rejected' (another 4xx,
    e.g. a prompt too long for the server: this row cannot be sent).
    ``retry_after`` is the server's Retry-After in seconds, if it sent one.
    """

    def __init__(self, reason: str, detail: str = "", *, kind: str = "transient", retry_after: float | None = None):
        self.reason = reason
        self.kind = kind
        self.retry_after = retry_after
        super().__init__(f"{reason}: {detail}" if detail else reason)

    @property
    def transient(self) -> bool:
        return self.kind == "transient"


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def status_kind(code: int) -> str:
    """'transient', 'fatal' or 'rejected' for an HTTP error status."""
    if code in TRANSIENT_STATUS or code >= 500:
        return "transient"
    return "fatal" if code in FATAL_STATUS else "rejected"


@dataclasses.dataclass(frozen=True)
class ChatClient:
    """Endpoint settings; `complete` sends one conversation and returns the assistant's text."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    temperature: float = 0.0
    max_tokens: int | None = None

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None, **kw) -> "ChatClient":
        """Fill what is not given from OPENAI_BASE_URL, OPENAI_MODEL and OPENAI_API_KEY."""
        model = model or os.environ.get("OPENAI_MODEL")
        if not model:
            raise ValueError("no model: pass --model or set OPENAI_MODEL")
        return cls(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            model=model,
            api_key=api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"),
            **kw,
        )

    def complete(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The assistant text of the first choice; raises `EndpointError`."""
        body: dict = {"model": self.model, "messages": list(messages), "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as e:
            try:
                body = e.read(300).decode("utf-8", "replace")
            except (OSError, ValueError):
                body = ""
            wait = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            raise EndpointError(f"http-{e.code}", body, kind=status_kind(e.code), retry_after=wait) from e
        except (TimeoutError, socket.timeout) as e:
            raise EndpointError("timeout", f"no answer within {self.timeout} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise EndpointError("timeout", f"no answer within {self.timeout} s") from e
            raise EndpointError("unreachable", str(e.reason)) from e
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            raise EndpointError("connection", f"{type(e).__name__}: {e}") from e
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise EndpointError("bad-reply", payload[:300].decode("utf-8", "replace")) from e
        if not isinstance(content, str):
            raise EndpointError("bad-reply", "the message has no text content")
        return content
