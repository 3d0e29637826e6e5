"""Parsing and validation of an annotated response into plan rounds (METHOD §1).

A response is a sequence of *rounds*. Each round is plan text holding zero or
more *promises*, then (if it has promises) its *group* of spans, one
``<async>…</async>`` block per promise, then the ``<sync/>`` or ``<|im_end|>``
that ends the round. A round without promises is plain AR text running to
``<|im_end|>``. Nothing is repaired: every violation raises a `PlanError`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from pdjax.structure import errors
from pdjax.structure.control import CONTROL_STRINGS, ControlIds

DEFAULT_LENGTH_SCALE = 10


@dataclasses.dataclass(frozen=True)
class Promise:
    """`<promise>-<topic>` … `</topic>` at positions [start, end]; `topic` are the tokens between."""

    start: int
    end: int
    topic: tuple[int, ...]
    number: int | None  # the stated length (first run of 1-2 digits); None if digits are unknown
    length: int | None  # number * length_scale: the mask slots its span gets when decoding


@dataclasses.dataclass(frozen=True)
class Span:
    """One block: `<async>` at `start`, `</async>` at `end`, content strictly between."""

    start: int
    end: int

    @property
    def content(self) -> slice:
        return slice(self.start + 1, self.end)

    @property
    def size(self) -> int:
        """Number of positions in the block, tags included."""
        return self.end - self.start + 1


@dataclasses.dataclass(frozen=True)
class Round:
    """A plan round: its promises, its group of spans, and what ended it."""

    start: int
    promises: tuple[Promise, ...]
    spans: tuple[Span, ...]
    end: int | None  # position of the <sync/> / <|im_end|> that ends the round; None if truncated
    closer: Literal["sync", "eos", None]

    @property
    def is_plain(self) -> bool:
        return not self.promises


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
    """A validated response: tokens[start:end] (end exclusive, the final <|im_end|> included)."""

    start: int
    end: int
    rounds: tuple[Round, ...]
    truncated: bool

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(s for r in self.rounds for s in r.spans)

    @property
    def promises(self) -> tuple[Promise, ...]:
        return tuple(p for r in self.rounds for p in r.promises)


def _name(ids: ControlIds, token: int) -> str:
    """The text of a control token (for error messages), or its id."""
    for field, text in CONTROL_STRINGS.items():
        if getattr(ids, field) == token:
            return text
    return f"token id {token}"


def promise_number(topic: Sequence[int], ids: ControlIds, position: int) -> int:
    """The length a promise states: the first run of 1-2 digit tokens among its topic tokens."""
    values = [ids.digit_value(int(t)) for t in topic]
    for i, v in enumerate(values):
        if v is None:
            continue
        run = 1
        while i + run < len(values) and values[i + run] is not None:
            run += 1
        if run > 2:
            raise errors.PromiseLengthTooLong(position + 1 + i, f"{run} digits")
        return int("".join(str(values[i + k]) for k in range(run)))
    raise errors.MissingPromiseLength(position)


def parse_response(
    tokens: Sequence[int] | np.ndarray,
    ids: ControlIds,
    start: int = 0,
    *,
    length_scale: int = DEFAULT_LENGTH_SCALE,
    allow_truncated: bool = False,
    allow_masks: bool = False,
) -> ParsedResponse:
    """Parse and validate tokens[start:] as a planned-diffusion response.

    Promise lengths are read only when ``ids.digits`` is known. Tokens after the
    final ``<|im_end|>`` (a chat template's trailing newline) are allowed if they
    hold no control token. ``allow_truncated`` accepts a response cut before its
    ``<|im_end|>`` (an unfinished decode) as long as no block or promise is left open.
    ``allow_masks`` accepts ``<|mask|>`` inside spans (a partly denoised decode).
    """
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    controls = ids.control_set
    read_lengths = bool(ids.digits)

    rounds: list[Round] = []
    round_start = start
    promises: list[Promise] = []
    spans: list[Span] = []
    span_open: int | None = None
    promise_open: int | None = None

    def close_round(pos: int, closer: Literal["sync", "eos"]) -> None:
        nonlocal round_start, promises, spans
        if closer == "sync" and not promises:
            raise errors.SyncWithoutPromise(pos)
        if len(spans) != len(promises):
            where = spans[0].start if spans else pos
            raise errors.SpanCountMismatch(where, f"{len(promises)} promise(s), {len(spans)} span(s)")
        rounds.append(Round(round_start, tuple(promises), tuple(spans), pos, closer))
        round_start, promises, spans = pos + 1, [], []

    for pos in range(start, len(toks)):
        tok = toks[pos]
        if span_open is not None:
            if tok == ids.async_end:
                spans.append(Span(span_open, pos))
                span_open = None
            elif tok == ids.async_start:
                raise errors.NestedAsync(pos)
            elif tok in controls and tok != ids.pad and not (allow_masks and tok == ids.mask):
                if ids.async_end not in toks[pos + 1 :]:  # the block never closes: that is the fault, not `tok`
                    raise errors.UnclosedAsync(span_open, f"{_name(ids, tok)} at token {pos} comes before any </async>")
                raise errors.ControlTokenInSpan(pos, _name(ids, tok))
            continue
        if promise_open is not None:
            if tok == ids.promise_end:
                topic = tuple(toks[promise_open + 1 : pos])
                number = promise_number(topic, ids, promise_open) if read_lengths else None
                length = None if number is None else number * length_scale
                promises.append(Promise(promise_open, pos, topic, number, length))
                promise_open = None
            elif tok in controls:
                raise errors.UnclosedPromise(promise_open, f"{_name(ids, tok)} at token {pos}")
            continue
        if spans and tok not in (ids.async_start, ids.sync, ids.eos):
            raise errors.TextAfterGroup(pos, f"token id {tok} after the last </async>")
        if tok == ids.async_start:
            span_open = pos
        elif tok == ids.async_end:
            raise errors.StrayAsyncEnd(pos)
        elif tok == ids.promise_start:
            promise_open = pos
        elif tok == ids.promise_end:
            raise errors.StrayPromiseEnd(pos)
        elif tok == ids.sync:
            close_round(pos, "sync")
        elif tok == ids.eos:
            close_round(pos, "eos")
            for tail in range(pos + 1, len(toks)):
                if toks[tail] in controls:
                    raise errors.ControlTokenAfterEnd(tail, _name(ids, toks[tail]))
            return ParsedResponse(start, pos + 1, tuple(rounds), truncated=False)
        elif tok == ids.pad:
            raise errors.PadOutsideSpan(pos)
        elif tok == ids.mask:
            raise errors.MaskInResponse(pos)

    if span_open is not None:
        raise errors.UnclosedAsync(span_open)
    if promise_open is not None:
        raise errors.UnclosedPromise(promise_open, "end of tokens")
    if not allow_truncated:
        raise errors.MissingEndOfTurn(len(toks))
    if spans:  # a finished group waiting for its <sync/> / <|im_end|>
        if len(spans) != len(promises):
            raise errors.SpanCountMismatch(spans[0].start, f"{len(promises)} promise(s), {len(spans)} span(s)")
    rounds.append(Round(round_start, tuple(promises), tuple(spans), None, None))
    return ParsedResponse(start, len(toks), tuple(rounds), truncated=True)
