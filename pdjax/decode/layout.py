"""On-device plan handling: the plan grammar, promise parsing and the group layout (METHOD §1, §4).

Everything here works on one example (vmap it over a batch) with fixed shapes.

*Plan grammar.* While planning, tokens that would make the response malformed
get probability 0, so every decoded response parses with
`pdjax.structure.parse_response`:

- never sampled in a plan: ``<async>``, ``</async>``, ``[PAD]``, ``<|mask|>``
  (the decoder lays those out itself);
- outside a promise: no ``</topic>``; no ``<sync/>`` in a round without a
  promise (such a round is plain text running to ``<|im_end|>``); no new
  ``<promise>-<topic>`` once the round has ``max_spans`` promises;
- inside a promise: no ``<promise>-<topic>``, ``<sync/>`` or ``<|im_end|>``;
  no ``</topic>`` before the length's first digit; no third digit in the
  length's first run of digits.

*Group layout.* The round's promises are read between the round's first plan
token and the closer (``<sync/>`` / ``<|im_end|>``); the length of promise i is
``length_table[first run of 1-2 digits]`` (``int(number * length_scale)``).
Span i is ``<async>`` + ``<|mask|>`` x length + ``</async>``, spans in promise
order right after the plan, then the closer.

*Budget.* If the group and its closer do not fit under ``max_length``, the
spans are shortened to fit, in promise order: each keeps its promised length
while the budget lasts, the one that crosses it gets what is left, later ones
get no masks (``<async></async>``). If not even the tags and the closer fit,
the response stops after the plan (finish reason "length").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.structure import ControlIds

NOT_A_DIGIT = -1


def length_table(length_scale: float) -> np.ndarray:
    """[100] int32: the masks a promise stating `number` gets, ``int(number * length_scale)``."""
    if not length_scale > 0:
        raise ValueError(f"length_scale must be > 0, got {length_scale}")
    return np.array([int(n * length_scale) for n in range(100)], np.int32)


def digit_values(ids: ControlIds, vocab_size: int) -> np.ndarray:
    """[vocab_size] int32: the value 0..9 of each digit token, NOT_A_DIGIT elsewhere."""
    if len(ids.digits) != 10:
        raise ValueError("planned decoding needs the ids of the digits '0'..'9' to read promise lengths")
    table = np.full(vocab_size, NOT_A_DIGIT, np.int32)
    table[list(ids.digits)] = np.arange(10, dtype=np.int32)
    return table


class Grammar(NamedTuple):
    """Plan-grammar state of one example: inside a promise?, digits of the length's first run, promises closed."""

    in_promise: jax.Array  # bool
    run: jax.Array  # int32: 0 no digit yet, 1 or 2 digits of the first run, 3 the first run is over
    promises: jax.Array  # int32: promises closed in this round

    @classmethod
    def fresh(cls) -> "Grammar":
        """The state at the start of a round."""
        return cls(jnp.bool_(False), jnp.int32(0), jnp.int32(0))


def grammar_bias(state: Grammar, ids: ControlIds, vocab_size: int, max_spans: int) -> jax.Array:
    """[V] float32: 0 for tokens the plan grammar allows next, -inf for the others."""
    inside = state.in_promise
    rules = [
        (ids.async_start, True),
        (ids.async_end, True),
        (ids.pad, True),
        (ids.mask, True),
        (ids.promise_end, ~inside | (state.run == 0)),
        (ids.promise_start, inside | (state.promises >= max_spans)),
        (ids.sync, inside | (state.promises == 0)),
        (ids.eos, inside),
    ]
    bias = jnp.zeros((vocab_size,), jnp.float32)
    for token, banned in rules:
        bias = bias.at[token].set(jnp.where(banned, -jnp.inf, 0.0))
    third_digit = inside & (state.run == 2)
    digits = jnp.asarray(ids.digits, jnp.int32)
    return bias.at[digits].set(jnp.where(third_digit, -jnp.inf, bias[digits]))


def grammar_step(state: Grammar, token: jax.Array, ids: ControlIds, digit_value: jax.Array) -> Grammar:
    """The grammar state after appending `token` to the plan (closers are handled by the layout)."""
    is_digit = digit_value[token] >= 0
    opens = ~state.in_promise & (token == ids.promise_start)
    closes = state.in_promise & (token == ids.promise_end)
    run = jnp.where(
        state.in_promise & is_digit & (state.run < 2),
        state.run + 1,
        jnp.where(state.in_promise & ~is_digit & (state.run > 0), 3, state.run),
    )
    run = jnp.where(opens, 0, run)
    return Grammar(
        jnp.where(opens, True, jnp.where(closes, False, state.in_promise)),
        run,
        state.promises + closes.astype(jnp.int32),
    )


def parse_promises(
    tokens: jax.Array, start: jax.Array, end: jax.Array, ids: ControlIds, digit_value: jax.Array, max_spans: int
) -> tuple[jax.Array, jax.Array]:
    """(numbers [max_spans] int32, count): the stated lengths of the closed promises in tokens[start:end].

    The number is the first run of digit tokens inside the promise, read as at most two digits
    (0 when a promise has none); promises beyond ``max_spans`` are not counted.
    """
    pos = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    live = (pos >= start) & (pos < end)
    opens = live & (tokens == ids.promise_start)
    closes = live & (tokens == ids.promise_end)
    index = jnp.cumsum(opens.astype(jnp.int32)) - 1  # promise each position belongs to
    inside = (jnp.cumsum(opens.astype(jnp.int32)) - jnp.cumsum(closes.astype(jnp.int32)) == 1) & ~opens & live
    value = digit_value[tokens]
    digit = inside & (value >= 0)
    slot = jnp.where(inside & (index < max_spans), index, max_spans)  # promises past max_spans: a dropped slot
    big = jnp.int32(tokens.shape[0])
    first = jax.ops.segment_min(jnp.where(digit, pos, big), slot, num_segments=max_spans + 1)[:max_spans]
    has = first < big
    first_c = jnp.clip(first, 0, tokens.shape[0] - 1)
    second_c = jnp.clip(first + 1, 0, tokens.shape[0] - 1)
    second_is_digit = has & digit[second_c] & (index[second_c] == index[first_c]) & (first + 1 < big)
    number = jnp.where(second_is_digit, value[first_c] * 10 + value[second_c], value[first_c])
    number = jnp.where(has, number, 0)
    count = jnp.minimum(jnp.sum(closes.astype(jnp.int32)), max_spans)
    return jnp.where(jnp.arange(max_spans) < count, number, 0), count


class Group(NamedTuple):
    """A laid-out group: span k covers group offsets [offset[k], offset[k+1]); `length` counts the masks."""

    offset: jax.Array  # [max_spans + 1] int32, offsets relative to the group start
    length: jax.Array  # [max_spans] int32 masks per span (after the budget)
    count: jax.Array  # spans in the group
    size: jax.Array  # group tokens, tags included (= offset[count])
    fits: jax.Array  # False: not even the tags and the closer fit; nothing is laid out


def plan_group(lengths: jax.Array, count: jax.Array, start: jax.Array, max_length: jax.Array | int) -> Group:
    """Lay out `count` spans with promised mask `lengths` from position `start`, shortened to fit the budget.

    The budget leaves room for the round's closer: the group ends at most at max_length - 1.
    """
    k = lengths.shape[0]
    used = jnp.arange(k) < count
    lengths = jnp.where(used, lengths, 0)
    spare = max_length - start - 2 * count - 1  # mask slots left once the tags and the closer are placed
    before = jnp.cumsum(lengths) - lengths
    kept = jnp.where(used, jnp.clip(spare - before, 0, lengths), 0)
    widths = jnp.where(used, kept + 2, 0)
    offset = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(widths).astype(jnp.int32)])
    return Group(offset, kept.astype(jnp.int32), count, offset[count], spare >= 0)


def span_of(offset: jax.Array, count: jax.Array, rel: jax.Array) -> jax.Array:
    """Span index of group-relative positions `rel` (-1 before the group, count-1 or more after it)."""
    k = offset.shape[0] - 1
    starts = jnp.where(jnp.arange(k) < count, offset[:k], jnp.iinfo(jnp.int32).max)
    return jnp.sum(rel[..., None] >= starts, axis=-1).astype(jnp.int32) - 1


def write_group(tokens: jax.Array, start: jax.Array, group: Group, ids: ControlIds) -> jax.Array:
    """tokens with the group's `<async>` + masks + `</async>` spans written from `start`."""
    pos = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    rel = pos - start
    span = jnp.clip(span_of(group.offset, group.count, rel), 0, group.offset.shape[0] - 2)
    first = rel == group.offset[span]
    last = rel == group.offset[span + 1] - 1
    laid = jnp.where(first, ids.async_start, jnp.where(last, ids.async_end, ids.mask))
    inside = (rel >= 0) & (rel < group.size)
    return jnp.where(inside, laid, tokens).astype(tokens.dtype)
