"""Rule-based annotation for users without an LLM endpoint.

List items and paragraphs become the spans of one round; a one-line lead-in
ending with ':' stays plan text before the promises. Topic words are the first
few content words of the span, the length is ceil(tokens / length_scale) with
the given tokenizer. A response with fewer than two such parts stays plain.
Removing the plan gives back the response character for character.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

from pdjax.structure.control import ASYNC_END, ASYNC_START, PROMISE_END, PROMISE_START
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE


class UnannotatableText(ValueError):
    """A response that no annotation can represent (it contains a control or special token string)."""

    reason = "control-string-in-text"


_LIST_ITEM = re.compile(r"\s*(?:[-*+\u2022]|\d{1,3}[.)]|[a-zA-Z][.)])\s+\S")
_WORD = re.compile(r"[^\W\d_]+")
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each even every few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just let like may me
    might more most must my myself no nor not now of off on once only or other our ours ourselves out over own
    same shall she should so some such than that the their theirs them themselves then there these they this
    those through to too under until up upon us very was we were what when where which while who whom why will
    with would yet you your yours yourself yourselves first second third next then finally also one two three
    four five six seven eight nine ten""".split()
)


def parts(text: str) -> list[tuple[int, int]]:
    """(start, end) character ranges of the paragraphs and list items of `text`, covering it completely.

    A part starts at the first non-blank line, at a line after a blank line, and at
    every list item (`-`, `*`, `+`, `•`, `1.`, `1)`, `a.`); whitespace between parts
    belongs to the part before it.
    """
    starts: list[int] = []
    offset = 0
    after_blank = True
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        if not blank and (after_blank or _LIST_ITEM.match(line)):
            starts.append(offset)
        after_blank = blank
        offset += len(line)
    if not starts:
        return [(0, len(text))] if text else []
    starts[0] = 0  # leading whitespace goes with the first part
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(text)])]


def topic_words(text: str, max_words: int = 3) -> str:
    """The first few distinct content words of `text`, lowercased, letters only (a topic must hold no digit)."""
    words: list[str] = []
    for w in _WORD.findall(text):
        w = w.lower()
        if len(w) > 2 and w not in STOPWORDS and w not in words:
            words.append(w[:24])
            if len(words) == max_words:
                break
    return " ".join(words) if words else "part"


def _is_lead_in(piece: str) -> bool:
    body = piece.strip()
    return "\n" not in body and body.endswith(":")


def annotate_rules(
    response: str, tokenizer: Any, *, length_scale: int = DEFAULT_LENGTH_SCALE, forbidden: Sequence[str] | None = None
) -> str:
    """The response with its list items / paragraphs as the spans of one round, or unchanged if it has < 2.

    Raises `UnannotatableText` if the response contains a string of the tokenizer's
    added vocabulary (a control tag, `<|im_end|>`, ...), which no annotation can hold.
    """
    if forbidden is None:
        forbidden = list(tokenizer.get_added_vocab())
    for s in forbidden:
        if s in response:
            raise UnannotatableText(f"the response contains the token string {s!r}")
    pieces = [response[s:e] for s, e in parts(response)]
    lead = ""
    if pieces and _is_lead_in(pieces[0]):
        lead, pieces = pieces[0], pieces[1:]
    if len(pieces) < 2:
        return response
    numbers = [max(1, math.ceil(len(tokenizer.encode(p, add_special_tokens=False)) / length_scale)) for p in pieces]
    if max(numbers) > 99:  # a length the plan language cannot state
        return response
    plan = "".join(f"{PROMISE_START}{topic_words(p)} {n}{PROMISE_END}" for p, n in zip(pieces, numbers))
    return lead + plan + "".join(f"{ASYNC_START}{p}{ASYNC_END}" for p in pieces)


def annotate_file_with_rules(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: Any,
    report: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    length_scale: int = DEFAULT_LENGTH_SCALE,
    limit: int | None = None,
) -> dict[str, int]:
    """Annotate a JSONL file with the rules (overwriting `output` and `report`); return counts.

    Every written completion is checked with `validate_annotation`; rows that
    cannot be annotated go to `report` with their reason.
    """
    from pdjax.annotate.rows import append_jsonl, read_rows
    from pdjax.annotate.validate import validate_annotation

    counts = {"written": 0, "planned": 0, "discarded": 0}
    forbidden = list(tokenizer.get_added_vocab())
    rows = list(read_rows(input_path, prompt_field, response_field, limit=limit))  # a bad input line: before writing
    for path in (output, report):
        open(path, "w").close()
    for row in rows:
        try:
            completion = annotate_rules(row.response, tokenizer, length_scale=length_scale, forbidden=forbidden)
            validate_annotation(row.response, completion, tokenizer)
        except (UnannotatableText, ValueError) as e:
            reason = getattr(e, "reason", type(e).__name__)
            append_jsonl(report, {"id": row.id, "index": row.index, "reason": reason, "errors": [str(e)]})
            counts["discarded"] += 1
            continue
        append_jsonl(output, {"id": row.id, "prompt": row.prompt, "completion": completion})
        counts["written"] += 1
        counts["planned"] += completion != row.response
    return counts
