"""Score a generated answer to a held-out prompt against the facts it should state.

Two numbers on one scale for every decoder:

- span accuracy (planned answers): the fraction of spans that state a right fact
  (every fact sentence in the span is an expected fact; a span stating none is wrong);
- fact accuracy (any answer, plan or not): the fraction of expected facts stated
  right in the clean answer (tags stripped), with no contradicting sentence.

Plus whether the plan is well-formed by the pdjax parser.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

from pdjax.annotate.validate import control_ids
from pdjax.structure import PlanError, parse_response, strip_plan
from pdjax.synthetic.facts import Fact, parse_claims


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The verdict on one answer. Span counts are 0 for a malformed plan (its spans cannot be trusted)."""

    well_formed: bool
    error: str | None
    planned: bool
    spans: int
    spans_right: int
    facts: int
    facts_right: int
    answer: str

    @property
    def span_accuracy(self) -> float | None:
        return self.spans_right / self.spans if self.spans else None

    @property
    def fact_accuracy(self) -> float | None:
        return self.facts_right / self.facts if self.facts else None


def _as_facts(facts: Iterable[Fact | Mapping]) -> list[Fact]:
    return [f if isinstance(f, Fact) else Fact.from_json(f) for f in facts]


def _text(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_completion(facts: Iterable[Fact | Mapping], completion: str | Sequence[int], tokenizer: Any) -> CheckResult:
    """Check one answer (text, or the response token ids) against the example's expected facts.

    Everything after the first `<|im_end|>` is ignored; an answer without one is
    read as if it ended there (the decoder may have dropped it).
    """
    ids = control_ids(tokenizer)
    toks = tokenizer.encode(completion, add_special_tokens=False) if isinstance(completion, str) else completion
    toks = [int(t) for t in toks]
    toks = toks[: toks.index(ids.eos)] if ids.eos in toks else toks
    toks.append(ids.eos)
    expected = {f.canonical() for f in _as_facts(facts)}
    expected_keys = {f.key for f in expected}

    try:
        parsed = parse_response(toks, ids)
        well_formed, error = True, None
    except PlanError as e:
        parsed, well_formed, error = None, False, str(e)

    spans = spans_right = 0
    if parsed is not None:
        for span in parsed.spans:
            claims = parse_claims(_text(tokenizer, [t for t in toks[span.content] if t != ids.pad]))
            spans += 1
            spans_right += bool(claims) and all(c.canonical() in expected for c in claims)

    answer = _text(tokenizer, [t for t in strip_plan(toks, ids) if t != ids.eos])
    stated = [c.canonical() for c in parse_claims(answer)]
    stated_set = set(stated)
    contradicted = {c.key for c in stated if c.key in expected_keys and c not in expected}
    facts_right = sum(f in stated_set and f.key not in contradicted for f in expected)
    planned = parsed is not None and bool(parsed.promises)
    return CheckResult(well_formed, error, planned, spans, spans_right, len(expected), facts_right, answer)


def summarize(results: Sequence[CheckResult]) -> dict[str, float | int | None]:
    """Totals over many answers: well-formed and planned shares, span and fact accuracy (over all spans / facts)."""
    n = len(results)
    spans = sum(r.spans for r in results)
    facts = sum(r.facts for r in results)
    return {
        "answers": n,
        "well_formed": sum(r.well_formed for r in results) / n if n else None,
        "planned": sum(r.planned for r in results) / n if n else None,
        "spans": spans,
        "span_accuracy": sum(r.spans_right for r in results) / spans if spans else None,
        "facts": facts,
        "fact_accuracy": sum(r.facts_right for r in results) / facts if facts else None,
    }
