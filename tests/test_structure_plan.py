"""Parsing, validation (one test per rule of METHOD §1) and display helpers."""

import numpy as np
import pytest
from hypothesis import given, settings

from pdjax.structure import PlanError, clean_tokens, parse_response, plan_view
from pdjax.structure import errors as E
from structures import IDS, Example, enc, responses


def parse(text: str, start: int = 1, **kw):
    return parse_response(enc(text), IDS, start, **kw)


def test_aurora_rounds_promises_and_lengths():
    r = parse(
        "q <promise>-<topic> what it is 1 </topic> <promise>-<topic> why 1 2 </topic> "
        "<async> a [PAD] </async> <async> b </async> <sync/> "
        "<promise>-<topic> so 3 </topic> <async> c </async> <|im_end|>"
    )
    assert [rnd.closer for rnd in r.rounds] == ["sync", "eos"]
    first, second = r.rounds
    assert [p.number for p in first.promises] == [1, 12]
    assert [p.length for p in first.promises] == [10, 120]  # length_scale 10
    assert first.promises[0].topic == tuple(enc("what it is 1"))
    assert [(s.start, s.end) for s in first.spans] == [(12, 15), (16, 18)]
    assert first.end == 19 and second.end == 27 and r.end == 28
    assert [p.length for p in second.promises] == [30]
    assert not r.truncated


def test_length_scale_replaces_ten():
    r = parse("q <promise>-<topic> x 4 </topic> <async> a </async> <|im_end|>", length_scale=7)
    assert r.rounds[0].promises[0].length == 28


def test_first_digit_run_is_the_length():
    r = parse("q <promise>-<topic> step 2 of 9 </topic> <async> a </async> <|im_end|>")
    assert r.promises[0].number == 2


def test_plain_round_and_plain_tail():
    r = parse("q just text <|im_end|>")
    assert len(r.rounds) == 1 and r.rounds[0].is_plain and r.rounds[0].closer == "eos"
    r = parse("q <promise>-<topic> a 1 </topic> <async> x </async> <sync/> more text <|im_end|>")
    assert [rnd.is_plain for rnd in r.rounds] == [False, True]


def test_tokens_after_end_of_turn_are_allowed_when_plain():
    r = parse("q hi <|im_end|> newline")
    assert r.end == 3


def test_truncated_response_when_allowed():
    r = parse("q <promise>-<topic> a 1 </topic> <async> x </async>", allow_truncated=True)
    assert r.truncated and r.rounds[-1].closer is None and len(r.rounds[-1].spans) == 1


def test_without_digit_ids_lengths_are_not_read():
    from dataclasses import replace

    r = parse_response(enc("q <promise>-<topic> a </topic> <async> x </async> <|im_end|>"), replace(IDS, digits=()), 1)
    assert r.promises[0].number is None and r.promises[0].length is None


# One test per malformed-input rule: error type and token position.
MALFORMED = [
    ("q <promise>-<topic> a 1 </topic> <async> x <async> y </async> </async> <|im_end|>", E.NestedAsync, 7),
    ("q <promise>-<topic> a 1 </topic> <async> x", E.UnclosedAsync, 5),
    ("q hi </async> <|im_end|>", E.StrayAsyncEnd, 2),
    ("q <promise>-<topic> a 1 </topic> <async> x <sync/> </async> <|im_end|>", E.ControlTokenInSpan, 7),
    ("q <promise>-<topic> a 1 <async> x </async> <|im_end|>", E.UnclosedPromise, 1),
    ("q hi </topic> <|im_end|>", E.StrayPromiseEnd, 2),
    ("q <promise>-<topic> a </topic> <async> x </async> <|im_end|>", E.MissingPromiseLength, 1),
    ("q <promise>-<topic> a 1 2 3 </topic> <async> x </async> <|im_end|>", E.PromiseLengthTooLong, 3),
    ("q <promise>-<topic> a 1 </topic> <promise>-<topic> b 1 </topic> <async> x </async> <|im_end|>",
     E.SpanCountMismatch, 9),
    ("q <promise>-<topic> a 1 </topic> <|im_end|>", E.SpanCountMismatch, 5),
    ("q hi <async> x </async> <|im_end|>", E.SpanCountMismatch, 2),
    ("q <promise>-<topic> a 1 </topic> <async> x </async> oops <|im_end|>", E.TextAfterGroup, 8),
    ("q hi <sync/> more <|im_end|>", E.SyncWithoutPromise, 2),
    ("q hi [PAD] <|im_end|>", E.PadOutsideSpan, 2),
    ("q hi <|mask|> <|im_end|>", E.MaskInResponse, 2),
    ("q <promise>-<topic> a 1 </topic> <async> x </async> <sync/>", E.MissingEndOfTurn, 9),
    ("q hi <|im_end|> <sync/>", E.ControlTokenAfterEnd, 3),
]


@pytest.mark.parametrize("text,error,position", MALFORMED, ids=[m[1].rule + f"-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_input_raises_typed_error_with_position(text, error, position):
    with pytest.raises(error) as info:
        parse(text)
    assert isinstance(info.value, PlanError)
    assert info.value.position == position
    assert info.value.rule in str(info.value) and f"token {position}" in str(info.value)


def test_every_error_class_is_exercised():
    assert {m[1] for m in MALFORMED} | {E.UnstrippedPlan} == set(E.ALL_ERRORS)


def test_unstripped_plan_in_ar_only_layout():
    from pdjax.structure import segments_from_tokens

    with pytest.raises(E.UnstrippedPlan) as info:
        segments_from_tokens(enc("q <promise>-<topic> a 1 </topic> <async> x </async> <|im_end|>"), 1, IDS, mode="ar_only")
    assert info.value.position == 1


@settings(max_examples=100, deadline=None)
@given(responses())
def test_generated_responses_parse_back(ex: Example):
    r = parse_response(ex.tokens, IDS, ex.prompt_len)
    assert [(s.start, s.end) for s in r.spans] == ex.spans
    assert [rnd.end for rnd in r.rounds if rnd.closer == "sync"] == ex.syncs


def test_clean_tokens_and_plan_view():
    toks = enc(
        "q intro <promise>-<topic> what 1 </topic> <promise>-<topic> why 1 </topic> "
        "<async> a [PAD] </async> <async> b c </async> <sync/> end <|im_end|> nl"
    )
    np.testing.assert_array_equal(clean_tokens(toks, IDS, 1), enc("intro a b c end"))
    view = plan_view(toks, IDS, 1)
    assert [(p.kind, p.round, p.index) for p in view] == [
        ("text", 0, -1),
        ("promise", 0, 0),
        ("promise", 0, 1),
        ("span", 0, 0),
        ("span", 0, 1),
        ("sync", 0, -1),
        ("text", 1, -1),
    ]
    assert view[1].tokens == tuple(enc("what 1")) and view[1].number == 1
    assert view[3].tokens == tuple(enc("a")) and view[4].tokens == tuple(enc("b c"))
    assert view[6].tokens == tuple(enc("end"))


def test_plan_view_of_an_unfinished_decode_with_masks():
    toks = enc("q <promise>-<topic> a 1 </topic> <async> x <|mask|> </async>")
    view = plan_view(toks, IDS, 1)
    assert [p.kind for p in view] == ["promise", "span"]
    assert view[1].tokens == tuple(enc("x <|mask|>"))
