"""Validation of an annotated response: the pdjax parser, content preservation, honest lengths.

An annotation is accepted when its tokens (with `<|im_end|>` appended) parse as
a well-formed planned-diffusion response and removing the plan gives back the
original response (modulo whitespace). Promise numbers can be recomputed from
the spans, since an annotator cannot count the tokens of the target tokenizer.
"""

from __future__ import annotations

import math
import re
import unicodedata
import weakref
from typing import Any

from pdjax.structure import ControlIds, ParsedResponse, PlanError, add_control_tokens, parse_response, strip_plan
from pdjax.structure.control import PROMISE_END, PROMISE_START
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE


class AnnotationRejected(ValueError):
    """An annotation that cannot be used; `reason` is a short code, `feedback` tells an annotator what to fix."""

    def __init__(self, reason: str, feedback: str):
        self.reason = reason
        self.feedback = feedback
        super().__init__(f"{reason}: {feedback}")


_CONTROL_IDS: "weakref.WeakKeyDictionary[Any, tuple[int, ControlIds]]" = weakref.WeakKeyDictionary()


def control_ids(tokenizer: Any) -> ControlIds:
    """`ControlIds.from_tokenizer`, cached per tokenizer (reading a 150k vocabulary takes ~0.15 s)."""
    size = len(tokenizer)
    hit = _CONTROL_IDS.get(tokenizer)
    if hit is None or hit[0] != size:  # a grown vocabulary may hold new control tokens
        hit = _CONTROL_IDS[tokenizer] = (size, ControlIds.from_tokenizer(tokenizer))
    return hit[1]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer with the control tokens added if it lacks them (any tokenizer with `<|im_end|>` will do)."""
    try:
        control_ids(tokenizer)
    except KeyError:
        add_control_tokens(tokenizer)
    return tokenizer


def forbidden_strings(tokenizer: Any) -> list[str]:
    """Added-token strings other than the plan tags (e.g. `<|im_end|>`, `<|im_start|>`): never allowed in text."""
    from pdjax.structure.control import ASYNC_END, ASYNC_START, PAD, SYNC

    tags = {PROMISE_START, PROMISE_END, ASYNC_START, ASYNC_END, SYNC, PAD}
    return sorted(s for s in tokenizer.get_added_vocab() if s not in tags)


def _text(tokenizer: Any, tokens: Any) -> str:
    return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _squeeze(text: str) -> str:
    return "".join(unicodedata.normalize("NFC", text).split())


def _context(tokenizer: Any, tokens: list[int], position: int, width: int = 8) -> str:
    return _text(tokenizer, tokens[max(0, position - width) : position + width])


def validate_annotation(response: str, completion: str, tokenizer: Any) -> ParsedResponse:
    """Parse `completion` (the annotated `response`) and check it keeps the response's content.

    Raises `AnnotationRejected` with the parser's rule name or 'special-token' /
    'content-changed' as reason. Returns the parsed response (positions index the
    tokens of ``completion`` + `<|im_end|>`).
    """
    ids = control_ids(tokenizer)
    for s in forbidden_strings(tokenizer):
        if s in completion:
            raise AnnotationRejected("special-token", f"the annotation contains {s!r}; it must not")
    tokens = list(tokenizer.encode(completion, add_special_tokens=False)) + [ids.eos]
    try:
        parsed = parse_response(tokens, ids)
    except PlanError as e:
        near = _context(tokenizer, tokens, e.position)
        raise AnnotationRejected(e.rule, f"{e.explanation}{f' ({e.detail})' if e.detail else ''}, near {near!r}") from e
    kept = _text(tokenizer, strip_plan(tokens, ids)[:-1])
    if _squeeze(kept) != _squeeze(response):
        a, b = _squeeze(kept), _squeeze(response)
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        raise AnnotationRejected(
            "content-changed",
            "without its tags the annotation differs from the response: it reads "
            f"{a[max(0, i - 20) : i + 20]!r} where the response has {b[max(0, i - 20) : i + 20]!r} "
            "(whitespace ignored); keep every word of the response, in order",
        )
    return parsed


_PROMISE = re.compile(re.escape(PROMISE_START) + "(.*?)" + re.escape(PROMISE_END), re.DOTALL)
_NUMBER = re.compile("[0-9]+")


def honest_numbers(parsed: ParsedResponse, tokens: list[int], ids: ControlIds, length_scale: int) -> list[int]:
    """ceil(span tokens / length_scale) for every promise, in order ([PAD] not counted)."""
    numbers = []
    for span in parsed.spans:
        count = sum(1 for t in tokens[span.content] if t != ids.pad)
        numbers.append(max(1, math.ceil(count / length_scale)))
    return numbers


def recompute_lengths(
    response: str, completion: str, tokenizer: Any, length_scale: int = DEFAULT_LENGTH_SCALE
) -> tuple[str, int]:
    """Rewrite every promise number as ceil(span tokens / length_scale); return the completion and how many changed.

    The annotation must validate first; the rewritten one is validated again.
    """
    ids = control_ids(tokenizer)
    parsed = validate_annotation(response, completion, tokenizer)
    tokens = list(tokenizer.encode(completion, add_special_tokens=False)) + [ids.eos]
    numbers = honest_numbers(parsed, tokens, ids, length_scale)
    if any(n > 99 for n in numbers):
        raise AnnotationRejected(
            "span-too-long", f"a span has more than {99 * length_scale} tokens; split it into several spans"
        )
    changed = sum(p.number != n for p, n in zip(parsed.promises, numbers))
    it = iter(numbers)
    # The parser reads the first run of digits of a promise; replace exactly that run.
    rewritten = _PROMISE.sub(
        lambda m: PROMISE_START + _NUMBER.sub(str(next(it)), m.group(1), count=1) + PROMISE_END, completion
    )
    validate_annotation(response, rewritten, tokenizer)
    return rewritten, changed
