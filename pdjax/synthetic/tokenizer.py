"""A small byte-level BPE tokenizer for the default model, trained with `tokenizers`.

Shaped like Qwen2's so that the plan language behaves the same: the Qwen2
pre-tokenizer (one token per digit, which the promise-length parser relies on),
byte-level bytes, `<|endoftext|>` / `<|im_start|>` / `<|im_end|>` specials, a
ChatML chat template, eos `<|im_end|>`, and the control tokens of METHOD §1
added under their released strings by `pdjax.structure.add_control_tokens`.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from pdjax.structure import add_control_tokens

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's pre-tokenizer split: contractions, letter runs (with one leading
# non-letter), single digits, punctuation runs, newlines, other whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chatml(prompt: str, completion: str, system: str | None) -> str:
    """One conversation as ChatML text (what the tokenizer is trained on)."""
    turns = ([("system", system)] if system is not None else []) + [("user", prompt), ("assistant", completion)]
    return "".join(f"{IM_START}{role}\n{text}{IM_END}\n" for role, text in turns)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1536, min_frequency: int = 2) -> Any:
    """Train the byte-level BPE on `texts` and wrap it as a transformers fast tokenizer.

    The returned tokenizer already holds the control tokens (`<|mask|>` and the six
    tags), the ChatML template, eos `<|im_end|>` and pad `<|endoftext|>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    add_control_tokens(hf)
    return hf


def save_tokenizer(tokenizer: Any, path: str | os.PathLike) -> None:
    """Save as a transformers tokenizer folder that `AutoTokenizer.from_pretrained` loads offline."""
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(str(path))
