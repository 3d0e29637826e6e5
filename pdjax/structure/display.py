"""Display helpers: the clean answer, and a structured view of the plan for the CLI.

Both work on token ids; turning ids into text is the tokenizer's job.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from pdjax.structure.control import ControlIds
from pdjax.structure.plan import parse_response
from pdjax.structure.segments import strip_plan

PieceKind = Literal["text", "promise", "span", "sync"]


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a response in reading order.

    ``text``: plain or plan text; ``promise``: the topic tokens (length digits
    included) and the stated ``number``; ``span``: the content of span ``index``
    of the round's group, ``[PAD]`` removed; ``sync``: a `<sync/>` barrier.
    ``round`` and ``index`` number rounds and promise/span pairs from 0.
    """

    kind: PieceKind
    tokens: tuple[int, ...]
    round: int
    index: int = -1
    number: int | None = None


def clean_tokens(tokens: Sequence[int] | np.ndarray, ids: ControlIds, start: int = 0) -> np.ndarray:
    """The answer a user reads: tokens[start:] without plan, tags, [PAD], masks, and cut at <|im_end|>."""
    stripped = strip_plan(tokens, ids, start)[start:]
    ends = np.flatnonzero(stripped == ids.eos)
    return stripped[: ends[0]] if len(ends) else stripped


def plan_view(tokens: Sequence[int] | np.ndarray, ids: ControlIds, start: int = 0) -> list[Piece]:
    """The response tokens[start:] as pieces (text, promises, spans, syncs), for colouring.

    Accepts unfinished responses (no `<|im_end|>` yet); raises `PlanError` on malformed ones.
    """
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    resp = parse_response(toks, ids, start, allow_truncated=True, allow_masks=True)
    pieces: list[Piece] = []
    for r, rnd in enumerate(resp.rounds):
        cursor = rnd.start
        for i, p in enumerate(rnd.promises):
            if p.start > cursor:
                pieces.append(Piece("text", tuple(toks[cursor : p.start]), r))
            pieces.append(Piece("promise", p.topic, r, i, p.number))
            cursor = p.end + 1
        plan_end = rnd.spans[0].start if rnd.spans else (rnd.end if rnd.end is not None else resp.end)
        if plan_end > cursor:
            pieces.append(Piece("text", tuple(t for t in toks[cursor:plan_end] if t != ids.eos), r))
        for i, s in enumerate(rnd.spans):
            content = tuple(t for t in toks[s.content] if t != ids.pad)
            pieces.append(Piece("span", content, r, i))
        if rnd.closer == "sync":
            pieces.append(Piece("sync", (), r))
    return [p for p in pieces if p.kind != "text" or p.tokens]
