"""The OpenAI chat-completions protocol as pydantic models (the subset pdjax serves), as vLLM writes it.

Requests are validated strictly (a string where a number belongs is an error, not
a coercion); unknown fields are ignored, as OpenAI-compatible servers do, so that
clients sending newer fields keep working. The planned-diffusion knobs are extra
body fields with the CLI's names (`python -m pdjax.decode --help`).
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pdjax.decode.decoder import DecodeOptions
from pdjax.decode.sampling import ALGS


class TextPart(BaseModel):
    """One part of a message's content list; only text parts are served."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat turn; `developer` is OpenAI's newer name for `system`."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Sampling defaults are the decoder's (temperature 0.2, top_p 0.95);
    without a seed each request draws a fresh one."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # planned diffusion (extra body fields)
    steps_ratio: Annotated[float, Field(gt=0.0)] | None = None
    confidence_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    length_scale: Annotated[float, Field(gt=0.0)] | None = None
    alg: Literal[ALGS] | None = None  # type: ignore[valid-type]
    dense: bool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stop

    def stop_strings(self) -> list[str]:
        """`stop` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def options(self) -> DecodeOptions:
        """The decoder's options (the CLI's defaults where a field is absent); ValueError on bad knob values."""
        base = DecodeOptions()
        top_p = base.top_p if self.top_p is None else self.top_p
        return DecodeOptions(
            steps_ratio=base.steps_ratio if self.steps_ratio is None else self.steps_ratio,
            confidence_threshold=self.confidence_threshold,
            length_scale=base.length_scale if self.length_scale is None else self.length_scale,
            alg=base.alg if self.alg is None else self.alg,
            temperature=base.temperature if self.temperature is None else self.temperature,
            top_p=None if top_p is None or top_p >= 1 else top_p,  # as the CLI: 1 turns the nucleus off
            top_k=self.top_k or None,
            dense=bool(self.dense),
            seed=secrets.randbelow(2**31) if self.seed is None else self.seed,
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
        )


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def completion_id() -> str:
    """A fresh chat completion id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    """Unix seconds, for `created`."""
    return int(time.time())
