"""A tiny ChatML tokenizer and annotated toy rows for the data tests (helpers imported by test_data_*).

The tokenizer is a `tokenizers` WordLevel model over the test's words, digits
split one by one (as Qwen2 does), `<|im_start|>` / `<|im_end|>`, a ChatML chat
template on a transformers `PreTrainedTokenizerFast`, and the plan tags added
with `pdjax.structure.add_control_tokens`.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np

from pdjax.data import DataConfig
from pdjax.structure import ControlIds, add_control_tokens

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega item question answer topic"
).split()
CONTENT = WORDS[:20]


@functools.lru_cache(maxsize=None)
def toy_tokenizer():
    """The shared toy tokenizer (built once; encoding is thread-safe)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", *"0123456789", ".", ",", "system", "user", "assistant"]
    words += ["You", "are", "a", "helpful", *WORDS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", unk_token="[UNK]", additional_special_tokens=["<|im_start|>"]
    )
    tok.chat_template = CHATML
    add_control_tokens(tok)
    return tok


def toy_ids() -> ControlIds:
    return ControlIds.from_tokenizer(toy_tokenizer())


def encode(text: str) -> list[int]:
    return toy_tokenizer()(text, add_special_tokens=False)["input_ids"]


def prompt_ids(prompt: str) -> list[int]:
    """The chat prompt written out by hand (system turn, user turn, assistant header)."""
    return encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


def question(index: int) -> str:
    """A prompt that names its row: 'question item 1 2' for row 12."""
    return "question item " + " ".join(str(index))


def row_of(tokens: np.ndarray) -> int:
    """The row number a document's prompt names (inverse of `question`)."""
    toks = toy_tokenizer().convert_ids_to_tokens([int(t) for t in tokens])
    start = toks.index("item") + 1
    end = toks.index("<|im_end|>", start)
    return int("".join(toks[start:end]))


def annotated(rng: random.Random, rounds: int | None = None) -> str:
    """A well-formed annotated completion: 1-2 rounds of 1-3 promises, spans of 1-4 words, an optional tail."""
    rounds = rounds or rng.randint(1, 2)
    parts = []
    for r in range(rounds):
        n = rng.randint(1, 3)
        if rng.random() < 0.5:
            parts.append(rng.choice(CONTENT) + " ")
        for _ in range(n):
            parts.append(f"<promise>-<topic>{rng.choice(CONTENT)} {rng.randint(1, 9)}</topic>")
        for _ in range(n):
            parts.append("<async>" + " ".join(rng.choices(CONTENT, k=rng.randint(1, 4))) + "</async>")
        if r < rounds - 1:
            parts.append("<sync/>")
    if rounds > 1 and rng.random() < 0.5:
        parts.append("<sync/>" + " ".join(rng.choices(CONTENT, k=2)))
    return "".join(parts)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def toy_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": question(i), "completion": annotated(rng)} for i in range(count)]


def toy_config(tmp_path: Path, source: str, **kw) -> DataConfig:
    """A small single-host config that keeps datasets' cache inside the test's folder."""
    base = dict(
        source=source, row_length=96, batch_size=2, num_epochs=1, cache_dir=str(tmp_path / "cache"),
        shard_index=0, shard_count=1, num_threads=0,
    )
    return DataConfig(**{**base, **kw})


def documents(batch: dict[str, np.ndarray]) -> list[tuple[int, int, slice]]:
    """(batch row, doc id, slice) of every document in a batch."""
    out = []
    for b, doc in enumerate(batch["doc_id"]):
        for d in np.unique(doc[doc > 0]):
            where = np.flatnonzero(doc == d)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "a document must be contiguous"
            out.append((b, int(d), slice(int(where[0]), int(where[-1]) + 1)))
    return out


def test_toy_tokenizer_has_single_control_tokens_and_split_digits():
    ids = toy_ids()
    assert encode("<promise>-<topic>alpha 12</topic>") == [ids.promise_start, *encode("alpha"), ids.digits[1], ids.digits[2], ids.promise_end]
    assert len(encode("<async><sync/>[PAD]</async>")) == 4


def test_toy_helpers_round_trip_the_row_number():
    assert row_of(np.asarray(prompt_ids(question(307)))) == 307
