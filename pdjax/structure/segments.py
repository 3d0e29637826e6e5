"""Per-token segment ids that encode who may attend to whom (METHOD §2).

For query i and key j of one row:

    allowed(i, j) = doc(i) == doc(j)
                    and ((block(i) == block(j) != 0) or visible_from(j) <= position(i))

`block_id` is 0 outside blocks; `visible_from` is a token's own position outside
blocks and, for block tokens, the position of the first `<sync/>` after the block
(`NEVER` if none). Four layouts (`Mode`):

- ``planned``: one block per span (sparse groups: spans of a group are isolated);
- ``dense``:   one block per group (PD-DA: spans of a round see each other);
- ``ar_only``: the response (tags stripped) is causal, like the prompt;
- ``diffusion_only``: the response (tags stripped) is one bidirectional block.
  pdjax anchors that block at the last prompt token, which plays the role of
  ``<async>``: it predicts the first response token (Dream's j-1 convention) and
  so must see the whole block. The released code instead makes the whole
  sequence bidirectional, prompt included, which no KV cache can serve.

The prompt is causal in every layout, as in the released training masks.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple, Sequence

import numpy as np

from pdjax.structure import errors
from pdjax.structure.control import ControlIds
from pdjax.structure.plan import ParsedResponse, parse_response

NEVER = 2**30  # `visible_from` of a block no <sync/> ever releases; larger than any position

Mode = Literal["planned", "dense", "ar_only", "diffusion_only"]
MODES: tuple[str, ...] = ("planned", "dense", "ar_only", "diffusion_only")


class Role(enum.IntEnum):
    """What a token is, for targets and loss normalisation."""

    PROMPT = 0
    PLAN = 1  # response text outside blocks: plan tokens, plain text, <sync/>, the final <|im_end|>
    TAG = 2  # <async> / </async>
    SPAN = 3  # block content (text and [PAD]): the diffusion targets
    TAIL = 4  # after the final <|im_end|> (a chat template's trailing newline); never a target
    PADDING = 5  # filler of a packed row


RESPONSE_ROLES = (Role.PLAN, Role.TAG, Role.SPAN)


class Segments(NamedTuple):
    """Segment ids of a row (shape [L]) or a batch ([B, L]); a JAX pytree of int arrays."""

    block_id: np.ndarray
    visible_from: np.ndarray
    position: np.ndarray
    doc_id: np.ndarray
    role: np.ndarray

    @property
    def length(self) -> int:
        return int(self.position.shape[-1])


def _strip_check(tokens: list[int], prompt_len: int, ids: ControlIds, end: int) -> None:
    plan_ids = ids.control_set - {ids.eos}
    for pos in range(prompt_len, end):
        if tokens[pos] in plan_ids:
            raise errors.UnstrippedPlan(pos, f"token id {tokens[pos]}")


def _response_end(tokens: list[int], prompt_len: int, ids: ControlIds) -> int:
    """Index one past the first <|im_end|> of the response."""
    for pos in range(prompt_len, len(tokens)):
        if tokens[pos] == ids.eos:
            return pos + 1
    raise errors.MissingEndOfTurn(len(tokens))


def segments_from_tokens(
    tokens: Sequence[int] | np.ndarray,
    prompt_len: int,
    ids: ControlIds,
    dense_groups: bool = False,
    *,
    mode: Mode | None = None,
    parsed: ParsedResponse | None = None,
) -> Segments:
    """Segment ids of one document: prompt tokens[:prompt_len], response after.

    ``dense_groups=True`` is the ``dense`` layout; ``mode`` selects any layout
    (it overrides ``dense_groups``). Planned layouts validate the response with
    `parse_response` and raise its `PlanError`s; ``ar_only``/``diffusion_only``
    take a response whose plan tags were removed with `strip_plan`.
    """
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    n = len(toks)
    if not 1 <= prompt_len <= n:
        raise ValueError(f"prompt_len must be in [1, {n}], got {prompt_len}")
    mode = mode or ("dense" if dense_groups else "planned")
    if mode not in MODES:
        raise ValueError(f"unknown segment mode {mode!r}; expected one of {MODES}")

    position = np.arange(n, dtype=np.int32)
    visible_from = position.copy()
    block_id = np.zeros(n, np.int32)
    doc_id = np.ones(n, np.int32)
    role = np.full(n, Role.PLAN, np.int32)
    role[:prompt_len] = Role.PROMPT

    if mode in ("planned", "dense"):
        resp = parsed or parse_response(toks, ids, prompt_len)
        role[resp.end :] = Role.TAIL
        next_block = 1
        for rnd in resp.rounds:
            releaser = rnd.end if rnd.closer == "sync" else NEVER
            for span in rnd.spans:
                block_id[span.start : span.end + 1] = next_block
                visible_from[span.start : span.end + 1] = releaser
                role[span.start] = role[span.end] = Role.TAG
                role[span.content] = Role.SPAN
                if mode == "planned":
                    next_block += 1
            if mode == "dense" and rnd.spans:
                next_block += 1
    elif mode == "ar_only":
        end = _response_end(toks, prompt_len, ids)
        _strip_check(toks, prompt_len, ids, end)
        _strip_check(toks, end, ids, n)
        role[end:] = Role.TAIL
    else:  # diffusion_only: the anchor (last prompt token) and the whole response form one block
        _response_end(toks, prompt_len, ids)
        _strip_check(toks, prompt_len, ids, n)
        block_id[prompt_len - 1 :] = 1
        visible_from[prompt_len - 1 :] = NEVER
        role[prompt_len:] = Role.SPAN  # every response token is a diffusion target (eos fill included)
    return Segments(block_id, visible_from, position, doc_id, role)


def strip_plan(tokens: Sequence[int] | np.ndarray, ids: ControlIds, start: int = 0) -> np.ndarray:
    """tokens with everything of the plan removed after `start`: promises (whole), tags, `<sync/>`, `[PAD]`.

    What stays is the prompt, plain text, span content and `<|im_end|>`: the
    response an AR-only or diffusion-only model is trained on, and the clean
    answer shown to users (drop the eos for display).
    """
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    out = toks[:start]
    in_promise = False
    drop = {ids.async_start, ids.async_end, ids.sync, ids.pad, ids.mask}
    for tok in toks[start:]:
        if in_promise:
            in_promise = tok != ids.promise_end
        elif tok == ids.promise_start:
            in_promise = True
        elif tok not in drop:
            out.append(tok)
    return np.asarray(out, np.int32)


def padding_segments(length: int, start_position: int = 0) -> Segments:
    """Segments of `length` filler tokens: doc 0, causal among themselves so every row has a key."""
    position = np.arange(start_position, start_position + length, dtype=np.int32)
    zeros = np.zeros(length, np.int32)
    return Segments(zeros, position.copy(), position, zeros.copy(), np.full(length, Role.PADDING, np.int32))


def pack_documents(
    docs: Sequence[tuple[np.ndarray, Segments]], length: int, pad_id: int
) -> tuple[np.ndarray, Segments]:
    """Concatenate documents into one row of `length` tokens, padding the rest.

    Documents get doc ids 1..n (0 is padding) and row-unique block ids;
    positions stay per document (RoPE restarts at each document).
    """
    total = sum(len(t) for t, _ in docs)
    if total > length:
        raise ValueError(f"documents hold {total} tokens, more than the row length {length}")
    parts_t: list[np.ndarray] = []
    parts_s: list[Segments] = []
    block_offset = 0
    for doc, (toks, seg) in enumerate(docs, start=1):
        if len(toks) != seg.length:
            raise ValueError(f"document {doc}: {len(toks)} tokens but {seg.length} segment ids")
        block = np.where(seg.block_id > 0, seg.block_id + block_offset, 0).astype(np.int32)
        block_offset = max(block_offset, int(block.max(initial=0)))
        parts_t.append(np.asarray(toks, np.int32))
        parts_s.append(seg._replace(block_id=block, doc_id=np.full(len(toks), doc, np.int32)))
    if total < length:
        parts_t.append(np.full(length - total, pad_id, np.int32))
        parts_s.append(padding_segments(length - total))
    row = Segments(*(np.concatenate([getattr(s, f) for s in parts_s]) for f in Segments._fields))
    return np.concatenate(parts_t), row
