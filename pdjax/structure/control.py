"""Control tokens of the planned-diffusion annotation language (METHOD §1).

Ids are always resolved from a tokenizer by *string*; nothing in pdjax hard-codes
them. ``add_control_tokens`` extends a Qwen2/Dream tokenizer in the released
order, so Dream's tokenizer ends up with the released checkpoints' ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PROMISE_START = "<promise>-<topic>"
PROMISE_END = "</topic>"
ASYNC_START = "<async>"
ASYNC_END = "</async>"
SYNC = "<sync/>"
PAD = "[PAD]"
MASK = "<|mask|>"
EOS = "<|im_end|>"

# The order in which the released training script adds the tags (after Dream's
# own `<|mask|>`); on Dream's tokenizer this yields ids 151667..151672.
RELEASED_ADD_ORDER: tuple[str, ...] = (ASYNC_START, ASYNC_END, PROMISE_START, PROMISE_END, SYNC, PAD)

# ControlIds field name -> token string.
CONTROL_STRINGS: Mapping[str, str] = {
    "async_start": ASYNC_START,
    "async_end": ASYNC_END,
    "sync": SYNC,
    "eos": EOS,
    "pad": PAD,
    "promise_start": PROMISE_START,
    "promise_end": PROMISE_END,
    "mask": MASK,
}

DIGITS = "0123456789"


class MissingControlTokens(KeyError):
    """The tokenizer lacks one or more control strings of the annotation language."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        super().__init__(
            "tokenizer lacks the planned-diffusion control token(s) "
            + ", ".join(repr(s) for s in missing)
            + "; add them with pdjax.structure.add_control_tokens(tokenizer) "
            "(and resize the model's embeddings if the vocabulary grows)"
        )

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]


@dataclasses.dataclass(frozen=True)
class ControlIds:
    """Token ids of the control strings, plus the ids of the digits '0'..'9'.

    ``digits`` is needed only to read promise lengths; it may be empty when a
    caller only needs the block structure (attention masks, targets).
    """

    async_start: int
    async_end: int
    sync: int
    eos: int
    pad: int
    promise_start: int
    promise_end: int
    mask: int
    digits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        controls = [getattr(self, name) for name in CONTROL_STRINGS]
        if len(set(controls)) != len(controls):
            raise ValueError(f"control token ids must be distinct, got {self}")
        if self.digits and len(self.digits) != 10:
            raise ValueError(f"digits must hold the ids of '0'..'9' (10 ids), got {len(self.digits)}")
        if set(self.digits) & set(controls):
            raise ValueError("a digit id collides with a control token id")

    @property
    def control_set(self) -> frozenset[int]:
        """Every control id (mask and eos included)."""
        return frozenset(getattr(self, name) for name in CONTROL_STRINGS)

    def digit_value(self, token: int) -> int | None:
        """The value 0..9 of a digit token, or None."""
        try:
            return self.digits.index(token)
        except ValueError:
            return None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ControlIds":
        """Resolve every control string (and the digits) from a tokenizer's vocabulary.

        Accepts a transformers tokenizer or a `tokenizers.Tokenizer`. Raises
        `MissingControlTokens` naming every absent string.
        """
        found = _lookup(tokenizer, (*CONTROL_STRINGS.values(), *DIGITS))
        missing = [s for s in CONTROL_STRINGS.values() if found[s] is None]
        if missing:
            raise MissingControlTokens(missing)
        digits = tuple(found[d] for d in DIGITS)
        return cls(
            **{name: found[s] for name, s in CONTROL_STRINGS.items()},
            digits=digits if None not in digits else (),
        )


def _lookup(tokenizer: Any, strings: tuple[str, ...]) -> dict[str, int | None]:
    """Each string's id as one whole token, or None; cheaper than building the full vocabulary."""
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        return {s: tokenizer.token_to_id(s) for s in strings}
    out: dict[str, int | None] = {}
    for s in strings:
        i = tokenizer.convert_tokens_to_ids(s)
        # an unknown string maps to the unk id (or None): confirm by the reverse lookup
        out[s] = int(i) if i is not None and tokenizer.convert_ids_to_tokens(int(i)) == s else None
    return out


def _vocab(tokenizer: Any) -> dict[str, int]:
    """The full vocabulary (added tokens included) of either tokenizer flavour."""
    try:  # tokenizers.Tokenizer
        return tokenizer.get_vocab(with_added_tokens=True)
    except TypeError:  # transformers tokenizers take no argument and include added tokens
        return tokenizer.get_vocab()


def add_control_tokens(tokenizer: Any) -> int:
    """Add `<|mask|>` (if absent) and the six tags in the released order; return how many were added.

    On Dream's tokenizer (151666 = `<|mask|>`) the tags get ids 151667..151672, the
    ids of the released checkpoints. The tags are plain added tokens, as in the
    released code; `<|mask|>` is added as a special (mask) token.
    """
    from tokenizers import AddedToken

    vocab = _vocab(tokenizer)
    if EOS not in vocab:
        raise MissingControlTokens([EOS])
    added = 0
    if MASK not in vocab:
        mask = AddedToken(MASK, special=True, normalized=False)
        if hasattr(tokenizer, "add_special_tokens") and hasattr(tokenizer, "mask_token"):
            added += tokenizer.add_special_tokens({"mask_token": mask})
        else:
            added += tokenizer.add_special_tokens([mask])
    new = [AddedToken(s, special=False, normalized=False) for s in RELEASED_ADD_ORDER if s not in vocab]
    if new:
        added += tokenizer.add_tokens(new)
    return added
