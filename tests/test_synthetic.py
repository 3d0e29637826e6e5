"""The synthetic data set of the default model: seeded, split by question, well-formed, honest, checkable."""

import calendar
import json
import math
from pathlib import Path

import pytest

from pdjax.model.tokenizer import chat_prompt_ids, control_ids, load_tokenizer
from pdjax.structure import parse_response, strip_plan
from pdjax.synthetic.__main__ import main
from pdjax.synthetic.dataset import tokenizer_corpus
from pdjax.synthetic.facts import Fact, parse_claims
from pdjax.synthetic.generate import generate, shape_counts
from pdjax.synthetic.tokenizer import train_tokenizer

NUM_TRAIN, NUM_HELDOUT = 400, 100


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A small data folder made by the CLI (tokenizer trained on its 400 train rows)."""
    out = tmp_path_factory.mktemp("synthetic")
    assert main(["--out", str(out), "--seed", "7", "--num_train", str(NUM_TRAIN), "--num_heldout", str(NUM_HELDOUT)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(built):
    return load_tokenizer(built / "tokenizer")


def rows(built: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (built / f"{split}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- generator


def test_generation_is_determined_by_the_seed():
    a_train, a_held = generate(3, 300, 60)
    b_train, b_held = generate(3, 300, 60)
    c_train, _ = generate(4, 300, 60)
    assert a_train == b_train and a_held == b_held
    assert [e.prompt for e in a_train] != [e.prompt for e in c_train]


def test_tokenizer_training_is_deterministic():
    corpus = tokenizer_corpus(generate(5, 200, 0)[0])
    assert train_tokenizer(corpus).backend_tokenizer.to_str() == train_tokenizer(corpus).backend_tokenizer.to_str()


def test_split_is_disjoint_by_prompt_and_question(built):
    train, held = rows(built, "train"), rows(built, "heldout")
    assert len(train) == NUM_TRAIN and len(held) == NUM_HELDOUT
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in train}) == NUM_TRAIN
    tr, ho = generate(7, NUM_TRAIN, NUM_HELDOUT)
    assert not {e.key for e in tr} & {e.key for e in ho}
    assert [e.prompt for e in ho] == [r["prompt"] for r in held]


def test_shares_of_shapes(built):
    # 45 / 35 / 20 % of one-round / multi-round / plain, exactly, in both splits
    assert shape_counts(500, {"one_round": 0.45, "multi_round": 0.35, "plain": 0.2}) == {
        "one_round": 225, "multi_round": 175, "plain": 100,
    }  # fmt: skip
    for split, n in (("train", NUM_TRAIN), ("heldout", NUM_HELDOUT)):
        shapes = [r["shape"] for r in rows(built, split)]
        assert {s: shapes.count(s) for s in set(shapes)} == {
            "one_round": 0.45 * n, "multi_round": 0.35 * n, "plain": 0.20 * n,
        }  # fmt: skip
    assert shape_counts(10, {"one_round": 1, "multi_round": 1, "plain": 1}) in (
        {"one_round": 4, "multi_round": 3, "plain": 3},
        {"one_round": 3, "multi_round": 4, "plain": 3},
        {"one_round": 3, "multi_round": 3, "plain": 4},
    )


# ----------------------------------------------------------------------------- rendered data


def test_every_completion_parses_with_honest_lengths(built, tokenizer):
    ids = control_ids(tokenizer)
    for row in rows(built, "train") + rows(built, "heldout"):
        toks = tokenizer.encode(row["completion"] + "<|im_end|>", add_special_tokens=False)
        parsed = parse_response(toks, ids)
        rounds = len(parsed.rounds) - (1 if parsed.rounds[-1].is_plain else 0)
        if row["shape"] == "plain":
            assert not parsed.promises and len(parsed.rounds) == 1
        elif row["shape"] == "one_round":
            assert rounds == 1 and 2 <= len(parsed.promises) <= 4
        else:
            assert rounds >= 2 or (rounds == 1 and parsed.rounds[-1].is_plain and len(parsed.rounds) == 2)
            assert parsed.rounds[0].closer == "sync"
        for rnd in parsed.rounds:
            for promise, span in zip(rnd.promises, rnd.spans):
                assert promise.number == math.ceil((span.end - span.start - 1) / 10)
        # the plan stripped is the plain answer, token for token
        clean = strip_plan(toks, ids)[:-1]
        assert tokenizer.decode(clean, skip_special_tokens=False) == row["answer"]


def test_spans_state_one_fact_each_and_later_rounds_use_earlier_spans(built, tokenizer):
    ids = control_ids(tokenizer)
    for row in rows(built, "train"):
        facts = [Fact.from_json(f) for f in row["facts"]]
        assert parse_claims(row["answer"]) == facts
        toks = tokenizer.encode(row["completion"] + "<|im_end|>", add_special_tokens=False)
        parsed = parse_response(toks, ids)
        span_facts = [parse_claims(tokenizer.decode(toks[s.content])) for s in parsed.spans]
        assert all(len(f) == 1 for f in span_facts)
        if row["shape"] == "multi_round":
            first_round = parsed.rounds[0]
            assert first_round.closer == "sync"
            last = facts[-1]
            # what the last round states is about things the rounds before it wrote down
            last_sentence = parse_claims(row["answer"])[-1].sentence()
            earlier = row["answer"][: row["answer"].rindex(last_sentence[1:])]
            assert all(arg in earlier for arg in last.args), (row["completion"], last)


def reference_value(fact: Fact) -> str | None:
    """The value of an intrinsic fact computed independently (Python's calendar, str methods); None for tables."""
    a = fact.args
    if fact.kind == "parity":
        return ("even", "odd")[int(a[0]) & 1]
    if fact.kind in ("next", "previous"):
        return str(int(a[0]) + (1 if fact.kind == "next" else -1))
    if fact.kind in ("tens", "ones"):
        return a[0][-2 if fact.kind == "tens" else -1]
    if fact.kind == "compare":
        return "greater" if int(a[0]) > int(a[1]) else "less"
    if fact.kind in ("first_letter", "last_letter"):
        return a[0][0 if fact.kind == "first_letter" else -1]
    if fact.kind == "letter_count":
        return str(len(a[0]))
    if fact.kind == "longer":
        return "longer" if len(a[0]) > len(a[1]) else "shorter"
    days, months = list(calendar.day_name), list(calendar.month_name)[1:]
    if fact.kind in ("next_day", "previous_day"):
        return days[(days.index(a[0]) + (1 if fact.kind == "next_day" else -1)) % 7]
    if fact.kind in ("next_month", "previous_month"):
        return months[(months.index(a[0]) + (1 if fact.kind == "next_month" else -1)) % 12]
    if fact.kind == "month_days":
        return str(calendar.monthrange(2023, months.index(a[0]) + 1)[1])
    if fact.kind == "month_number":
        return str(months.index(a[0]) + 1)
    return None


def test_facts_are_true(built):
    kinds = set()
    for row in rows(built, "train") + rows(built, "heldout"):
        for f in map(Fact.from_json, row["facts"]):
            kinds.add(f.kind)
            expected = reference_value(f)
            if expected is not None:
                assert f.value == expected, f
            elif f.kind == "price":  # read back from the table in the prompt
                assert f" {f.args[0]} {f.value}," in row["prompt"].replace(".", ",")
    assert len(kinds) >= 16


def test_tokenizer_shape(built, tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert 256 < len(tokenizer) <= 1536 + 10
    ids = control_ids(tokenizer)  # every control string resolves
    assert len(ids.digits) == 10
    assert [tokenizer.decode([t]) for t in tokenizer.encode("2024", add_special_tokens=False)] == list("2024")
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<promise>-<topic>", "<sync/>", "[PAD]", "<|mask|>"):
        assert len(tokenizer.encode(s, add_special_tokens=False)) == 1, s
    prompt = chat_prompt_ids(tokenizer, "Is 47 even or odd?")
    assert tokenizer.decode(prompt) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nIs 47 even or odd?<|im_end|>\n<|im_start|>assistant\n"
    )
    stats = json.loads((built / "stats.json").read_text())
    assert stats["train"]["examples"] == NUM_TRAIN and stats["vocab_size"] == len(tokenizer)


def test_chatterbot_plain_answers():
    pytest.importorskip("chatterbot_corpus")
    from pdjax.synthetic.chatterbot import chatterbot_pairs

    pairs = chatterbot_pairs()
    assert len(pairs) > 100 and len({p for p, _ in pairs}) == len(pairs)
    train, held = generate(1, 400, 50, plain_pairs=pairs)
    chatter = [e for e in train + held if e.family == "chatterbot"]
    assert chatter and all(e.shape == "plain" and (e.prompt, e.answer) in pairs for e in chatter)
    tokenizer = train_tokenizer(tokenizer_corpus(train))
    ids = control_ids(tokenizer)
    for e in chatter:
        parsed = parse_response(tokenizer.encode(e.answer + "<|im_end|>", add_special_tokens=False), ids)
        assert not parsed.promises


def test_checker_gives_the_reference_answers_full_marks(built, tokenizer):
    from pdjax.synthetic import check_completion, summarize

    held = rows(built, "heldout")
    planned = summarize([check_completion(r["facts"], r["completion"], tokenizer) for r in held])
    plain = summarize([check_completion(r["facts"], r["answer"], tokenizer) for r in held])
    assert planned["well_formed"] == 1.0 and planned["span_accuracy"] == 1.0 and planned["fact_accuracy"] == 1.0
    assert planned["planned"] == 0.8  # one-round + multi-round shares
    assert plain["spans"] == 0 and plain["fact_accuracy"] == 1.0 and plain["facts"] == planned["facts"]


@pytest.mark.parametrize("flags, says", [
    (["--num_train", "-5"], "argument --num_train: must be >= 1"),
    (["--num_train", "0"], "argument --num_train: must be >= 1"),
    (["--num_heldout", "-1"], "argument --num_heldout: must be >= 0"),
    (["--plain", "-1"], "argument --plain: must be >= 0"),
    (["--one_round", "0", "--multi_round", "0", "--plain", "0"], "add up to 0"),
])
def test_cli_bad_counts_and_shares_are_one_line_errors(flags, says, tmp_path, capsys):
    """Before: a negative --num_train wrote empty files, a negative or all-zero share ended in a traceback."""
    assert main(["--out", str(tmp_path / "d"), "--num_heldout", "2", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and not (tmp_path / "d").exists()


def test_asking_for_more_questions_than_exist_fails_fast(monkeypatch):
    """A family that can ask only one question: generate gives up after a run of repeats, with the counts."""
    import importlib

    gen_module = importlib.import_module("pdjax.synthetic.generate")  # the package exports a function of that name
    one = generate(0, 1, 0)[0][0]
    monkeypatch.setattr(gen_module, "task_families", lambda tasks: {s: (lambda rng: one,) for s in gen_module.SHAPES})
    with pytest.raises(ValueError, match=r"could not draw 10 distinct one_round questions \(got 1\); ask for fewer"):
        gen_module.generate(0, 10, 0, mix={"one_round": 1.0, "multi_round": 0.0, "plain": 0.0})
