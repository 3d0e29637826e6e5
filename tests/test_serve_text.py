"""The served answer text, fed token by token, against `pdjax.structure.clean_tokens` on the whole response."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdjax.decode.cli import DEFAULT_MODEL
from pdjax.model.tokenizer import control_ids, load_tokenizer
from pdjax.serve.text import AnswerText
from pdjax.structure import clean_tokens


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def completions(tokenizer) -> list[list[int]]:
    """Planned responses from the held-out file (plan, spans, [PAD], syncs), as token ids with <|im_end|>."""
    lines = (DEFAULT_MODEL / "heldout.jsonl").read_text().splitlines()[:20]
    texts = [json.loads(line)["completion"] for line in lines]
    return [tokenizer.encode(t + "<|im_end|>", add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_fed_in_pieces_equals_clean_tokens_of_the_whole(tokenizer, step):
    ids = control_ids(tokenizer)
    for response in completions(tokenizer):
        text = AnswerText(tokenizer, ids, ids.eos)
        sent, plan = "", ""
        for i in range(0, len(response), step):
            text.feed(response[i : i + step])
            a, p = text.delta(final=i + step >= len(response))
            sent, plan = sent + a, plan + p
        want = tokenizer.decode([int(t) for t in clean_tokens(np.asarray(response), ids)], skip_special_tokens=True)
        assert sent == want == text.text
        if ids.promise_start in response:
            assert plan.startswith("<promise>") and plan.count("<promise>") == plan.count("</topic>")
        else:
            assert plan == ""


def test_stop_strings_are_held_back_while_streaming(tokenizer):
    ids = control_ids(tokenizer)
    response = completions(tokenizer)[0]
    full = tokenizer.decode([int(t) for t in clean_tokens(np.asarray(response), ids)], skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    text = AnswerText(tokenizer, ids, ids.eos, stop=[stop])
    sent = ""
    for tok in response:
        text.feed([tok])
        sent += text.delta()[0]
        assert stop not in sent
    sent += text.delta(final=True)[0]
    assert sent == full[: full.index(stop)] and text.stopped
