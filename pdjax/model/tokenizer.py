"""Tokenizer loading, the special-token ids a checkpoint names, and the chat prompt of METHOD §4 step 1.

The tokenizer travels with a checkpoint folder; both training data and
decoding format prompts with `chat_prompt_ids`, so they agree token for token.

Loading never runs remote code and never asks to: a Dream-layout folder
(config.json with ``auto_map``, Dream's .py files beside it, possibly a
tokenizer_config.json naming Dream's own tokenizer class) is read with
transformers' built-in classes; Dream's tokenizer is Qwen2's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from pdjax.structure import ControlIds

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CONFIG_FILES = ("config.json", "generation_config.json")
ID_KEYS = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")


class TokenIdMismatch(ValueError):
    """config.json / generation_config.json name a special-token id the tokenizer disagrees with."""


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _custom_tokenizer_class(path: str) -> bool:
    """True when the folder's tokenizer_config.json asks for a tokenizer class from remote code."""
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    auto_map = config.get("auto_map") or {}
    named = str(config.get("tokenizer_class") or "")
    if "AutoTokenizer" in auto_map or (isinstance(auto_map, list) and auto_map):
        return True
    if not named:
        return False
    import transformers

    return not hasattr(transformers, named) and not hasattr(transformers, named.removesuffix("Fast"))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A transformers tokenizer from a local folder or a Hugging Face id; never runs or asks about remote code.

    A tokenizer class from remote code (Dream's ``DreamTokenizer``) is read as the built-in
    tokenizer of its files: tokenizer.json if present, else Qwen2's vocab.json + merges.txt.
    """
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
        if os.path.isdir(path) and _custom_tokenizer_class(path):
            return _builtin_tokenizer(path)
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except ValueError as e:  # a Hub id whose tokenizer_config names remote code
            if "trust_remote_code" not in str(e) and "custom code" not in str(e):
                raise
            return _builtin_tokenizer(path)
    except (OSError, ValueError) as e:  # no tokenizer files, an unreachable Hub id: one line naming the source
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{path}: cannot load a tokenizer ({first})") from e


def _builtin_tokenizer(path: str) -> Any:
    """The built-in tokenizer of a folder whose tokenizer class is remote code: tokenizer.json, else Qwen2's BPE."""
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    try:
        return PreTrainedTokenizerFast.from_pretrained(path)  # a Hub id with tokenizer.json
    except (OSError, ValueError, TypeError):
        return Qwen2Tokenizer.from_pretrained(path)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Special-token ids of a checkpoint: the configs' where they name them (checked), else the tokenizer's.

    ``stop`` is every id that ends an answer, in order: `<|im_end|>` (the chat turn's end) if the
    vocabulary has it, then the eos ids of the configs and of the tokenizer.
    """

    mask: int | None
    pad: int | None
    bos: int | None
    eos: int | None
    stop: tuple[int, ...]


def _config_ids(path: str) -> dict[str, list[tuple[str, int]]]:
    """key -> [(file, id), ...] for every id config.json / generation_config.json name (eos may be a list)."""
    found: dict[str, list[tuple[str, int]]] = {k: [] for k in ID_KEYS}
    for name in CONFIG_FILES:
        config = _read_json(os.path.join(path, name))
        for key in ID_KEYS:
            value = config.get(key)
            values = value if isinstance(value, list) else [value]
            found[key].extend((name, int(v)) for v in values if isinstance(v, int) and not isinstance(v, bool))
    return found


def _token(tokenizer: Any, i: int) -> str:
    token = tokenizer.convert_ids_to_tokens(int(i))
    return repr(token) if token is not None else "no token"


def special_ids(path: str | os.PathLike, tokenizer: Any) -> SpecialIds:
    """The mask/pad/bos/eos ids of the checkpoint at `path`, checked against `tokenizer`.

    Ids named in config.json or generation_config.json are used. A `TokenIdMismatch` names both sides when
    one is outside the vocabulary; when a mask or pad id differs from the tokenizer's mask / pad token; or
    when a bos or eos id is an ordinary (not special) token. bos and eos are not required to equal the
    tokenizer's own: released Dream and Qwen2 configs name `<|endoftext|>` where the tokenizer's eos is
    `<|im_end|>`, and both end an answer.
    """
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    own = {
        "mask_token_id": tokenizer.mask_token_id if getattr(tokenizer, "mask_token", None) else vocab.get("<|mask|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    named = _config_ids(os.fspath(path))
    chosen: dict[str, int | None] = {}
    for key in ID_KEYS:
        role = key.removesuffix("_token_id")
        mine = own[key]
        for file, i in named[key]:
            where = f"{file} {key} {i}"
            if not 0 <= i < size:
                raise TokenIdMismatch(f"{where} is outside the tokenizer's vocabulary of {size} tokens")
            if role in ("mask", "pad") and mine is not None and i != mine:
                raise TokenIdMismatch(f"{where} ({_token(tokenizer, i)}) differs from the tokenizer's {role} token "
                                      f"{_token(tokenizer, mine)} ({mine})")
            if role in ("bos", "eos") and i not in special:
                theirs = f"{_token(tokenizer, mine)} ({mine})" if mine is not None else "none"
                raise TokenIdMismatch(f"{where} is {_token(tokenizer, i)}, an ordinary token, not a special one; "
                                      f"the tokenizer's {role} token is {theirs}")
        chosen[key] = named[key][0][1] if named[key] else mine
    stop = ([vocab["<|im_end|>"]] if "<|im_end|>" in vocab else []) + [i for _, i in named["eos_token_id"]]
    if own["eos_token_id"] is not None:
        stop.append(int(own["eos_token_id"]))
    return SpecialIds(
        mask=chosen["mask_token_id"], pad=chosen["pad_token_id"], bos=chosen["bos_token_id"],
        eos=chosen["eos_token_id"], stop=tuple(dict.fromkeys(int(i) for i in stop)),
    )


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
