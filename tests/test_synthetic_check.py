"""The checker on hand-written answers: right and wrong facts, malformed plans, plain answers."""

import pytest

from pdjax.synthetic.check import check_completion, summarize
from pdjax.synthetic.dataset import tokenizer_corpus
from pdjax.synthetic.facts import Fact, parse_claims
from pdjax.synthetic.generate import generate
from pdjax.synthetic.tokenizer import train_tokenizer

# "Which word is longer, tiger or bird?"
FACTS = [
    {"kind": "letter_count", "args": ["tiger"], "value": "5"},
    {"kind": "letter_count", "args": ["bird"], "value": "4"},
    {"kind": "longer", "args": ["tiger", "bird"], "value": "longer"},
]
P = "<promise>-<topic>{} {}</topic>"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(generate(11, 300, 0)[0]))


def test_right_planned_answer(tokenizer):
    text = (
        P.format("tiger letters", 1) + P.format("bird letters", 1)
        + "<async>tiger has 5 letters.</async><async> bird has 4 letters.[PAD][PAD]</async><sync/>"
        + P.format("longer word", 1) + "<async> So tiger is longer than bird.</async>"
    )  # fmt: skip
    r = check_completion(FACTS, text, tokenizer)
    assert (r.well_formed, r.planned, r.spans, r.spans_right, r.facts, r.facts_right) == (True, True, 3, 3, 3, 3)
    assert r.span_accuracy == 1.0 and r.fact_accuracy == 1.0
    assert r.answer == "tiger has 5 letters. bird has 4 letters. So tiger is longer than bird."
    # the same answer given as token ids, with the eos and a trailing newline
    ids = tokenizer.encode(text + "<|im_end|>\n", add_special_tokens=False)
    assert check_completion(FACTS, ids, tokenizer) == r


def test_wrong_facts(tokenizer):
    text = (
        P.format("tiger letters", 1) + P.format("bird letters", 1)
        + "<async>tiger has 6 letters.</async><async> bird has 4 letters.</async><sync/>"
        + " So bird is longer than tiger."
    )  # fmt: skip
    r = check_completion(FACTS, text, tokenizer)
    assert r.well_formed and r.spans == 2 and r.spans_right == 1  # the plain tail is not a span
    assert r.facts_right == 1  # 'bird has 4 letters.' only; 'bird is longer than tiger' is tiger *shorter*
    # a span saying nothing checkable, or stating a fact nobody asked for, is wrong
    text = P.format("tiger", 1) + P.format("bird", 1) + "<async>hello</async><async> cat has 3 letters.</async>"
    r = check_completion(FACTS, text, tokenizer)
    assert (r.spans, r.spans_right, r.facts_right) == (2, 0, 0)


def test_contradiction_is_not_a_right_fact(tokenizer):
    r = check_completion(FACTS[:1], "tiger has 5 letters. tiger has 4 letters.", tokenizer)
    assert r.facts_right == 0 and r.fact_accuracy == 0.0


def test_malformed_plans(tokenizer):
    # spans of a round must follow its promises one for one
    r = check_completion(FACTS, P.format("tiger", 1) + "<async>tiger has 5 letters.</async><async> x</async>", tokenizer)
    assert not r.well_formed and "span-count-mismatch" in r.error and r.spans == 0
    assert r.facts_right == 1  # the clean text is still read for facts
    r = check_completion(FACTS, P.format("tiger", "") + "<async>tiger has 5 letters.</async>", tokenizer)
    assert not r.well_formed and "missing-promise-length" in r.error
    r = check_completion(FACTS, P.format("tiger", 1) + "<async>tiger has 5 letters.", tokenizer)
    assert not r.well_formed and "unclosed-async" in r.error  # the eos comes before any </async>


def test_plain_answers_score_on_the_same_scale(tokenizer):
    r = check_completion(FACTS, "tiger has 5 letters. bird has 4 letters. So tiger is longer than bird.", tokenizer)
    assert (r.well_formed, r.planned, r.spans, r.span_accuracy, r.fact_accuracy) == (True, False, 0, None, 1.0)
    # the other orientation of a comparison states the same fact
    r = check_completion(FACTS[2:], "bird is shorter than tiger.", tokenizer)
    assert r.fact_accuracy == 1.0
    r = check_completion([], "Hello! I am fine, thank you.", tokenizer)
    assert r.well_formed and r.fact_accuracy is None
    summary = summarize(
        [check_completion(FACTS, "tiger has 5 letters.", tokenizer), check_completion(FACTS, "<async>", tokenizer)]
    )
    assert summary == {
        "answers": 2, "well_formed": 0.5, "planned": 0.0, "spans": 0,
        "span_accuracy": None, "facts": 6, "fact_accuracy": 1 / 6,
    }  # fmt: skip


def test_claims_parser_reads_every_kind():
    text = (
        "47 is odd. The number after 9 is 10. The number before 10 is 9. The tens digit of 47 is 4. "
        "The ones digit of 47 is 7. So 5 is less than 12. The first letter of cat is c. "
        "The last letter of cat is t. cat has 3 letters. cat is shorter than tiger. The day after Sunday is Monday. "
        "The day before Monday is Sunday. The month after May is June. The month before May is April. "
        "May has 31 days. May is month 5 of the year. The fig costs 3 coins. So the fig costs less than the tea. "
        "147 is even."
    )
    kinds = [c.kind for c in parse_claims(text)]
    assert kinds == [
        "parity", "next", "previous", "tens", "ones", "compare", "first_letter", "last_letter", "letter_count",
        "longer", "next_day", "previous_day", "next_month", "previous_month", "month_days", "month_number",
        "price", "costlier", "parity",
    ]  # fmt: skip
    assert parse_claims("So 5 is less than 12.") == [Fact("compare", ("5", "12"), "less")]
    assert parse_claims("147 is even.") == [Fact("parity", ("147",), "even")]
