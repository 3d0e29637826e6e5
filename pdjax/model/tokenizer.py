"""Tokenizer loading and the chat prompt of METHOD §4 step 1.

The tokenizer travels with a checkpoint folder; both training data and
decoding format prompts with `chat_prompt_ids`, so they agree token for token.
"""

from __future__ import annotations

import os
from typing import Any

from pdjax.structure import ControlIds

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A transformers fast tokenizer from a local folder or a Hugging Face id."""
    from transformers import AutoTokenizer

    from pdjax.cli_errors import UserError
    from pdjax.model.checkpoint import check_model_folder, orbax_checkpoint

    path = os.fspath(path)
    if orbax_checkpoint(path) is not None:  # say what the folder is, not what tokenizer files it lacks
        check_model_folder(path)
    local = os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1
    if local and not os.path.isdir(path):
        raise UserError(f"{path}: no such tokenizer folder (pass a folder with tokenizer.json, or a Hub id ORG/NAME)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no tokenizer files, an unreachable Hub id: one line naming the source
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{path}: cannot load a tokenizer ({first})") from e


def chat_prompt_ids(
    tokenizer: Any, prompt: str, *, system: str | None = DEFAULT_SYSTEM_PROMPT, chat_template: bool = True
) -> list[int]:
    """Token ids of the prompt up to and including the assistant header.

    With ``chat_template`` (the default) the tokenizer's own chat template is
    applied to a system turn (``system``; None for none) and the user turn.
    Without it the prompt is tokenized as-is.
    """
    if not chat_template:
        return list(tokenizer.encode(prompt, add_special_tokens=False))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template; pass chat_template=False "
            "(`--no_chat_template` on the command line) to use the prompt as-is"
        )
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def control_ids(tokenizer: Any) -> ControlIds:
    """The control ids of a tokenizer (raises MissingControlTokens naming what is absent)."""
    return ControlIds.from_tokenizer(tokenizer)
