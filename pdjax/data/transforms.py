"""Per-example transforms: the paper's ablations and the `[PAD]` augmentation (METHOD §3).

`ablate_topic` works on the completion text before tokenization, as the
released code does. `drop_sync` removes `<sync/>` after tokenization, which on
every row pdjax accepts gives the tokens of the released text-level removal
(see its docstring). `with_pads` inserts the per-epoch `[PAD]` draw.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from pdjax.structure import NEVER, ControlIds, Segments
from pdjax.structure.control import PROMISE_END, PROMISE_START

# One promise: its opening tag, then anything up to the first </topic> that does
# not run into the next promise's opening tag.
_PROMISE = re.compile(
    re.escape(PROMISE_START) + r"((?:(?!" + re.escape(PROMISE_START) + r").)*?)" + re.escape(PROMISE_END),
    re.DOTALL,
)
_NUMBER = re.compile(r"[0-9]+")


def ablate_topic(completion: str) -> str:
    """Replace the topic words of every promise by ``topic N``, keeping its length number N.

    ``<promise>-<topic>history of the term 2</topic>`` becomes
    ``<promise>-<topic>topic 2</topic>`` (the paper's "without topics" ablation).
    N is the first run of digits, the number pdjax reads as the promised length.
    A promise with no digits is left as it is, so validation still reports it
    (missing-promise-length); a 3-digit run is kept whole (promise-length-too-long).

    The released code does this with a lazy DOTALL regex from ``<topic>`` to
    ``</topic>`` capturing the digits right before ``</topic>``. Its tag strings
    are the same as ours in effect: its ``<topic>`` matches the tail of the
    opening tag ``<promise>-<topic>``, so the output keeps ``<promise>-`` and
    reads ``<promise>-<topic>topic N</topic>`` exactly as here. It differs in
    two corner cases: it keeps the *trailing* digits (for ``2 steps 5`` it
    writes ``topic 5`` although both parsers read the length 2), and a promise
    without digits makes its match run on into the next promise, merging the two.
    """

    def replace(match: re.Match[str]) -> str:
        number = _NUMBER.search(match.group(1))
        if number is None:
            return match.group(0)
        return f"{PROMISE_START}topic {number.group(0)}{PROMISE_END}"

    return _PROMISE.sub(replace, completion)


def with_pads(tokens: np.ndarray, block_ends: Sequence[int], counts: Sequence[int], pad_id: int) -> np.ndarray:
    """tokens with ``counts[b]`` `[PAD]` ids inserted right before the `</async>` at ``block_ends[b]``."""
    where = np.repeat(np.asarray(block_ends, np.int64), np.asarray(counts, np.int64))
    return np.insert(np.asarray(tokens, np.int32), where, np.int32(pad_id))


def drop_sync(tokens: np.ndarray, seg: Segments, prompt_len: int, ids: ControlIds) -> tuple[np.ndarray, Segments]:
    """Remove every `<sync/>` of the response (the paper's "without sync" ablation) and re-lay the segments.

    Without barriers no group is ever released: block tokens keep their block
    and get ``visible_from = NEVER``, so later plan text and later groups never
    see earlier spans, which is the mask the released training code builds for
    data whose `<sync/>` was removed. The rounds merge: the last promise of a
    round now predicts the first plan token of the next round (`ar_targets`
    skips the group), and a model trained this way plans all its promises
    before `<|im_end|>`, as one round.

    Validity: pdjax's parser rejects a group followed by more plan text
    (text-after-group), so rows are validated *before* the removal, on the
    annotated text; a row valid there stays in training, laid out here. On such
    a row this token-level removal equals the released text-level one
    (``completion.replace("<sync/>", "")`` before tokenization): `<sync/>` is an
    added token and always follows `</async>`, another added token, so no text
    on its two sides merges into different tokens.
    """
    toks = np.asarray(tokens, np.int32)
    keep = (toks != ids.sync) | (np.arange(len(toks)) < prompt_len)
    block = np.asarray(seg.block_id)[keep]
    position = np.arange(int(keep.sum()), dtype=np.int32)
    visible = np.where(block > 0, np.int32(NEVER), position).astype(np.int32)
    out = Segments(block, visible, position, np.asarray(seg.doc_id)[keep], np.asarray(seg.role)[keep])
    return toks[keep], out
