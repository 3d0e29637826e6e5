"""The paper-shaped synthetic data (tasks=paper): its shape limits, held-out split, checker and CLI.

The limits come from the issue's spec of the paper's data (METHOD §5: a first round
has a median of 2 and a mean of 3.1 spans of 10-200 tokens): 2-4 promises per round,
spans of at least 12 and mostly 20-60 tokens of the data's own tokenizer, promises of
at most 6 tokens, at least two prompt-dependent facts per span, later rounds that
restate facts of round 1, and a share of plain answers.
"""

from __future__ import annotations

import collections
import json
import re

import pytest

from pdjax.data.synthetic_source import ensure_synthetic, parse_spec
from pdjax.structure import ControlIds, parse_response
from pdjax.synthetic import Fact, build_dataset, check_completion, generate, parse_claims
from pdjax.synthetic.__main__ import main as synthetic_main
from pdjax.synthetic.generate import shape_counts
from pdjax.synthetic.paper import PAPER_MIX

NUM_TRAIN, NUM_HELDOUT = 1500, 150


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    stats = build_dataset(out, 0, NUM_TRAIN, NUM_HELDOUT, tasks="paper")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    rows = {s: [json.loads(line) for line in open(out / f"{s}.jsonl")] for s in ("train", "heldout")}
    return stats, tok, rows


def _parsed(row, tok):
    ids = ControlIds.from_tokenizer(tok)
    toks = tok.encode(row["completion"], add_special_tokens=False) + [ids.eos]
    return toks, parse_response(toks, ids)


def _all_rows(rows):
    return rows["train"] + rows["heldout"]


def test_promises_per_round_and_promise_tokens(paper_data):
    _, tok, rows = paper_data
    planned = 0
    for row in _all_rows(rows):
        toks, parsed = _parsed(row, tok)
        for rnd in parsed.rounds:
            if rnd.is_plain:
                continue
            planned += 1
            assert 2 <= len(rnd.promises) <= 4, row["completion"]
            assert len(rnd.spans) == len(rnd.promises)
            for p in rnd.promises:
                assert p.end - p.start + 1 <= 6, tok.decode(toks[p.start : p.end + 1])
    assert planned > NUM_TRAIN // 2


def test_span_lengths(paper_data):
    _, tok, rows = paper_data
    lengths = []
    for row in _all_rows(rows):
        toks, parsed = _parsed(row, tok)
        for span in parsed.spans:
            lengths.append(len(toks[span.content]))
    assert min(lengths) >= 12
    assert max(lengths) <= 80
    within = sum(20 <= n <= 60 for n in lengths) / len(lengths)
    assert within >= 0.8, f"only {within:.0%} of spans are 20-60 tokens"


def test_every_span_states_two_prompt_facts_of_the_example(paper_data):
    _, tok, rows = paper_data
    texts = collections.Counter()
    for row in _all_rows(rows):
        toks, parsed = _parsed(row, tok)
        expected = {(f["kind"], tuple(f["args"]), f["value"]) for f in row["facts"]}
        for span in parsed.spans:
            text = tok.decode(toks[span.content])
            texts[text.strip()] += 1
            claims = parse_claims(text)
            assert all((c.kind, c.args, c.value) in expected for c in claims), text
            # facts about a subject the prompt names (a word, number, month, day or item of its price list)
            about_prompt = [c for c in claims if re.search(rf"\b{re.escape(c.args[0])}\b", row["prompt"])]
            assert len(about_prompt) >= 2, (row["prompt"], text)
    # no boilerplate: span texts are mostly unique, none is shared by a large part of the data
    total = sum(texts.values())
    assert len(texts) / total > 0.5
    assert texts.most_common(1)[0][1] < 0.01 * total


def test_later_rounds_restate_facts_of_round_one(paper_data):
    _, tok, rows = paper_data
    multi = 0
    for row in _all_rows(rows):
        toks, parsed = _parsed(row, tok)
        if len(parsed.rounds) < 2:
            continue
        multi += 1
        assert row["shape"] == "multi_round"
        first = {c for s in parsed.rounds[0].spans for c in parse_claims(tok.decode(toks[s.content]))}
        for rnd in parsed.rounds[1:]:
            for span in rnd.spans:
                text = tok.decode(toks[span.content])
                reused = [c for c in parse_claims(text) if c in first]
                assert len(reused) >= 2 and text.strip().split(". ")[-1].startswith("So "), text
    assert multi > 0


def test_shape_shares_and_plain_answers(paper_data):
    stats, tok, rows = paper_data
    total = shape_counts(NUM_TRAIN + NUM_HELDOUT, PAPER_MIX)
    got = collections.Counter(r["shape"] for r in _all_rows(rows))
    assert dict(got) == total
    assert stats["tasks"] == "paper"
    bound = stats["ideal_ar_over_pd_calls"]
    assert 1.0 < bound["steps_ratio_1.0"] < bound["steps_ratio_0.5"]
    ids = ControlIds.from_tokenizer(tok)
    for row in _all_rows(rows):
        toks, parsed = _parsed(row, tok)
        if row["shape"] == "plain":
            assert row["completion"] == row["answer"] and not parsed.promises
            assert ids.async_start not in toks
        else:
            assert parsed.promises
        if row["shape"] == "multi_round":
            assert len(parsed.rounds) >= 2


def test_heldout_combinations_are_never_trained_on():
    train, heldout = generate(3, 2000, 200, tasks="paper")
    assert not {e.key for e in train} & {e.key for e in heldout}
    assert not {e.prompt for e in train} & {e.prompt for e in heldout}
    # the key is the subject combination, whatever the family, shape or wording
    namespaces = {"numbers", "words", "months", "days", "prices", "mixed", "single", "chat"}
    assert {e.key.split("|")[0] for e in train + heldout} <= namespaces


def test_check_completion_right_and_wrong(paper_data):
    _, tok, rows = paper_data
    for row in rows["heldout"][:40]:
        right = check_completion(row["facts"], row["completion"], tok)
        assert right.well_formed and right.fact_accuracy in (1.0, None)
        if row["shape"] != "plain":
            assert right.span_accuracy == 1.0
        if not row["facts"]:
            continue
        assert check_completion(row["facts"], row["answer"], tok).fact_accuracy == 1.0
        # change one stated value: that fact (and its span) is no longer right
        first = parse_claims(row["answer"])[0]
        flipped = {
            "even": "odd",
            "odd": "even",
            "greater": "less",
            "less": "greater",
            "longer": "shorter",
            "more": "less",
        }
        wrong_value = flipped.get(first.value) or (
            str(int(first.value) + 3) if first.value.isdigit() else first.value + "x"
        )
        # every occurrence: neighbouring subjects' chains (days, months) can state the same fact twice
        bad = row["completion"].replace(first.sentence(), Fact(first.kind, first.args, wrong_value).sentence())
        assert bad != row["completion"]
        wrong = check_completion(row["facts"], bad, tok)
        assert wrong.fact_accuracy < 1.0


def test_cli_and_source_select_the_paper_tasks(tmp_path, capsys):
    assert (
        synthetic_main(
            ["--out", str(tmp_path / "cli"), "--num_train", "300", "--num_heldout", "30", "--tasks", "paper"]
        )
        == 0
    )
    printed = capsys.readouterr()
    stats = json.loads(printed.out)  # stdout is the stats alone; the steps of the build go to stderr
    assert stats["tasks"] == "paper" and stats["train"]["examples"] == 300
    steps = printed.err.splitlines()
    assert steps[0] == "drawing 300 train and 30 held-out questions (tasks paper, seed 0) ..." and len(steps) == 3
    assert steps[1].startswith("training the BPE tokenizer") and steps[2].startswith("writing train.jsonl")
    heldout = [json.loads(line) for line in open(tmp_path / "cli" / "heldout.jsonl")]
    assert len(heldout) == 30 and all({"prompt", "facts"} <= set(r) for r in heldout)
    # default data: no tasks key in its stats (the shipped models' data stays as it was)
    assert synthetic_main(["--out", str(tmp_path / "default"), "--num_train", "100", "--num_heldout", "10"]) == 0
    assert "tasks" not in json.loads(capsys.readouterr().out)
    spec = parse_spec(f"synthetic:{tmp_path / 'src'}?num_train=200&num_heldout=20&tasks=paper")
    assert spec.tasks == "paper"
    ensure_synthetic(f"synthetic:{tmp_path / 'src'}?num_train=200&num_heldout=20&tasks=paper", log=None)
    assert json.load(open(tmp_path / "src" / "stats.json"))["tasks"] == "paper"
    with pytest.raises(ValueError, match="tasks must be one of"):
        parse_spec("synthetic:x?tasks=nope")
    with pytest.raises(ValueError, match="holds synthetic data built with"):  # same folder, other task set
        ensure_synthetic(f"synthetic:{tmp_path / 'src'}?num_train=200&num_heldout=20", log=None)


def test_ideal_calls_follow_the_decoding_rule(paper_data):
    """METHOD §4: a planned round costs its promise tokens + int(max promised length * steps_ratio) calls."""
    from pdjax.synthetic.dataset import ideal_calls

    _, tok, _ = paper_data
    ids = ControlIds.from_tokenizer(tok)
    span_a, span_b = "The number after 47 is 48.", " 47 is odd."
    promises = "<promise>-<topic>first 2</topic><promise>-<topic>second 1</topic>"
    completion = promises + f"<async>{span_a}</async><async>{span_b}</async>"
    response = tok.encode(completion, add_special_tokens=False) + [ids.eos]
    ar_tokens = len(tok.encode(span_a + span_b, add_special_tokens=False)) + 1
    promise_tokens = len(tok.encode(promises, add_special_tokens=False))
    assert ideal_calls(response, ids, 1.0) == (ar_tokens, promise_tokens + 20 + 1)
    assert ideal_calls(response, ids, 0.5) == (ar_tokens, promise_tokens + 10 + 1)
    plain = tok.encode("47 is odd.", add_special_tokens=False) + [ids.eos]
    assert ideal_calls(plain, ids) == (len(plain), len(plain))
