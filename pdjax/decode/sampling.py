"""Sampling a token from logits, and the confidence of that choice (METHOD §4).

The order is the released decoder's: divide by the temperature (only when it
is > 0), keep the top-p nucleus, then the top-k, and take the softmax of what
is left. Greedy (temperature 0) takes the argmax. Every confidence is computed
from that filtered distribution:

- ``entropy``: negative entropy, sum p * log(p + 1e-10) (higher = more confident);
- ``maskgit_plus``: the probability of the chosen token (the max at temperature 0);
- ``topk_margin``: top-1 minus top-2 probability.

The knobs are traced values (a `SamplingParams` pytree), so changing them does
not recompile; the nucleus and the categorical draw are skipped with
`lax.cond` when no example needs them.

The nucleus is found without sorting the vocabulary when it can be decided
exactly (`_nucleus_top_k`): from the `lax.top_k` window of the largest
``NUCLEUS_WINDOW`` logits, whose cumulative mass agrees with the sort's up to a
worst-case rounding bound; only the rows that cannot be decided that way (a flat
distribution) are sorted (`_nucleus_top_k_sorted`), so the filtered logits are
the sort's bit for bit either way. Rows a caller does not read (``needed``)
never force the sort. Each knob is a scalar (one setting for
every row) or shaped like the rows' leading axes (one setting per row, as a
serving batch whose slots hold different requests): a row's result is the
same either way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

ALGS: tuple[str, ...] = ("entropy", "maskgit_plus", "topk_margin")
ENTROPY_EPS = 1e-10


class SamplingParams(NamedTuple):
    """Traced sampling knobs: temperature (0 = greedy), top_p (1 = off), top_k (0 = off), alg (index into ALGS)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    alg: jax.Array

    @classmethod
    def make(cls, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
             alg: str = "entropy") -> "SamplingParams":
        """Validated knobs with the reference's conventions (None turns top_p / top_k off)."""
        cls.check(temperature, top_p, top_k, alg)
        return cls(
            jnp.float32(temperature),
            jnp.float32(1.0 if top_p is None else top_p),
            jnp.int32(top_k or 0),
            jnp.int32(ALGS.index(alg)),
        )

    @staticmethod
    def check(temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
              alg: str = "entropy") -> None:
        """Raise ValueError on invalid knobs; touches no device (safe before `jax.distributed.initialize`)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if alg not in ALGS:
            raise ValueError(f"unknown alg {alg!r}; expected one of {ALGS}")


def _per_row(knob: jax.Array, ndim: int) -> jax.Array:
    """A knob broadcastable against an array of `ndim` dims whose leading axes are the knob's (scalars stay)."""
    knob = jnp.asarray(knob)
    return knob.reshape(knob.shape + (1,) * (ndim - knob.ndim))


def filter_logits(logits: jax.Array, params: SamplingParams, needed: jax.Array | None = None) -> jax.Array:
    """logits [..., V] / temperature (if > 0), with tokens outside the top-p nucleus and the top-k set to -inf.

    ``needed`` (bool, the rows' shape; default all) names the rows whose result is read: only a
    needed row whose nucleus the top-k window does not decide is sorted, so the other rows may
    hold a cut that is not the sort's.
    """
    logits = logits.astype(jnp.float32)
    temperature = _per_row(params.temperature, logits.ndim)
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)
    needs_sort = (params.top_p < 1.0) | (params.top_k > 0)
    if needed is None:
        needed = jnp.ones(logits.shape[:-1], bool)
    return jax.lax.cond(jnp.any(needs_sort), _nucleus_top_k, lambda x, p, n: x, logits, params, needed)


NUCLEUS_WINDOW = 32  # the fast path's candidates; larger nuclei (and top_k > this) take the sort


def _nucleus_top_k(logits: jax.Array, params: SamplingParams, needed: jax.Array) -> jax.Array:
    """`_nucleus_top_k_sorted`, sorting only the needed rows whose cut the top-k window does not decide."""
    if logits.shape[-1] < 2:
        return _nucleus_top_k_sorted(logits, params)
    filtered, decided = _nucleus_window(logits, params)

    # a nucleus beyond the window (a flat distribution, or a cut token lighter than the rounding bound)
    sort = lambda x: _sort_rows(x, params, filtered, decided | ~needed)  # noqa: E731
    return jax.lax.cond(jnp.all(decided | ~needed), lambda x: filtered, sort, logits)


def _sort_rows(logits: jax.Array, params: SamplingParams, filtered: jax.Array, done: jax.Array) -> jax.Array:
    """``filtered`` with the rows not ``done`` replaced by the sort's; only those rows are sorted, so a batch of
    serving rows with a few flat distributions never sorts every row.

    Off a TPU they are sorted in one group of 1, 4, 16, 64 or all rows; on a TPU, where each sort shape
    is minutes of compile for a large vocabulary, `SORT_GROUP` rows at a time in a loop (one shape).
    """
    return jax.lax.platform_dependent(logits, params, filtered, done, tpu=sort_rows_looped, default=sort_rows_grouped)


SORT_GROUP = 8  # rows per sort on a TPU


def _flat_rows(logits: jax.Array, params: SamplingParams, filtered: jax.Array, done: jax.Array):
    """Rows flattened to [N, V], the per-row top_p / top_k [N], and the order that puts rows to sort first."""
    vocab = logits.shape[-1]
    knob = lambda k: jnp.broadcast_to(_per_row(k, logits.ndim), logits.shape[:-1] + (1,)).reshape(-1)  # noqa: E731
    order = jnp.argsort(done.reshape(-1), stable=True)
    return (logits.reshape(-1, vocab), filtered.reshape(-1, vocab), ~done.reshape(-1), knob(params.top_p),
            knob(params.top_k), order)


def sort_rows_grouped(logits: jax.Array, params: SamplingParams, filtered: jax.Array, done: jax.Array) -> jax.Array:
    """`_sort_rows` with one sort of the first 1, 4, 16, 64 or all rows to sort (the fewest that hold them)."""
    flat, out, todo, top_p, top_k, order = _flat_rows(logits, params, filtered, done)
    n = flat.shape[0]
    sizes = sorted({min(s, n) for s in (1, 4, 16, 64)} | {n})

    def sort_first(size: int, out: jax.Array) -> jax.Array:
        at = order[:size]
        part = _nucleus_top_k_sorted(flat[at], params._replace(top_p=top_p[at], top_k=top_k[at]))
        return out.at[at].set(part)

    count = jnp.sum(todo)
    index = jnp.sum(count > jnp.asarray(sizes[:-1]))
    branches = [lambda out: out] + [functools.partial(sort_first, size) for size in sizes]
    return jax.lax.switch(jnp.where(count > 0, index + 1, 0), branches, out).reshape(logits.shape)


def sort_rows_looped(logits: jax.Array, params: SamplingParams, filtered: jax.Array, done: jax.Array) -> jax.Array:
    """`_sort_rows` with the rows to sort taken `SORT_GROUP` at a time by a while loop (one sort shape)."""
    flat, out, todo, top_p, top_k, order = _flat_rows(logits, params, filtered, done)
    n = flat.shape[0]
    group = min(SORT_GROUP, n)
    order = jnp.pad(order, (0, group))
    count = jnp.sum(todo, dtype=jnp.int32)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        start, out = carry
        at = jax.lax.dynamic_slice_in_dim(order, start, group)
        part = _nucleus_top_k_sorted(flat[at], params._replace(top_p=top_p[at], top_k=top_k[at]))
        target = jnp.where(start + jnp.arange(group) < count, at, n)  # past the rows to sort: dropped
        return start + group, out.at[target].set(part, mode="drop")

    out = jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), out))[1]
    return out.reshape(logits.shape)


def _mass_tolerance(vocab: int) -> float:
    """A bound on |the sort's cumulative softmax - ours| at any position (see `_nucleus_window`)."""
    return (4 * vocab + 64) * 2.0**-24


def _nucleus_window(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """The nucleus and top-k from the largest ``NUCLEUS_WINDOW`` logits; and per row whether that is the sort's.

    The sort keeps 1 + #{j < V - 1: cum[j] <= top_p} tokens (then at most top_k), cum being the
    cumulative softmax of the sorted logits. Its cum[j] and the one here both sum non-negative
    terms (the softmax denominator over all V, the prefix), in some order, so each is within
    (V + j + 2) ulps (relative) of the exact mass: a comparison with top_p is decided where the two
    cannot disagree (``tol`` covers both and exp's rounding). A row is decided when every j in the
    window is, and the window ends above top_p (the exact mass only grows after it); or, with
    top_k <= window, when top_k - 1 of them are below (min(kept, top_k) = top_k).
    """
    vocab = logits.shape[-1]
    window = min(NUCLEUS_WINDOW, vocab - 1)
    top_p, top_k = _per_row(params.top_p, logits.ndim), _per_row(params.top_k, logits.ndim)
    # the first `window` values of the descending sort, exactly; the barrier keeps XLA from folding
    # the later reads into the sort that top_k lowers to, which it would then no longer run as a TopK
    ranked = jax.lax.optimization_barrier(jax.lax.top_k(logits, window)[0])
    tol = _mass_tolerance(vocab)
    top = ranked[..., :1]
    total = jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)
    cum = jnp.cumsum(jnp.exp(ranked - top), axis=-1) / total
    below = cum < top_p - tol  # the sort's cum[j] <= top_p for sure
    above = cum > top_p + tol  # the sort's cum[j] > top_p for sure
    count = jnp.sum(below, axis=-1, keepdims=True)
    exact = jnp.all(below | above, axis=-1, keepdims=True) & above[..., -1:]
    capped = (top_k > 0) & (top_k <= window) & (count >= top_k - 1)
    kept = jnp.where(top_k > 0, jnp.minimum(1 + count, top_k), 1 + count)
    active = (top_p < 1.0) | (top_k > 0)
    cut = jnp.take_along_axis(ranked, jnp.clip(kept, 1, window) - 1, axis=-1)
    filtered = jnp.where((logits < cut) & active, -jnp.inf, logits)
    return filtered, (exact | capped | ~active)[..., 0]


def _nucleus_top_k_sorted(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The nucleus and top-k by a full sort of the vocabulary (the definition the fast path reproduces)."""
    top_p, top_k = _per_row(params.top_p, logits.ndim), _per_row(params.top_k, logits.ndim)
    ranked = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    # the nucleus: the first token, and every token whose predecessors' mass is still <= top_p
    kept = 1 + jnp.sum(cum[..., :-1] <= top_p, axis=-1, keepdims=True)
    kept = jnp.where(top_k > 0, jnp.minimum(kept, top_k), kept)
    # ties with the last kept value stay (the reference's top-k `<` test; its top-p keeps one of them)
    cut = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    # rows that filter nothing keep their logits exactly (cum may round past top_p = 1)
    return jnp.where((logits < cut) & ((top_p < 1.0) | (top_k > 0)), -jnp.inf, logits)


def _argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) as int32 (the first maximal index) by two vectorized reductions (XLA's CPU argmax is a
    scalar loop, ~5x slower); arrays holding a NaN take jnp.argmax itself (its NaN rule)."""

    def first_max(x: jax.Array) -> jax.Array:
        top = jnp.max(x, axis=-1, keepdims=True)
        return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)

    nan = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(jnp.any(jnp.isnan(x)), nan, first_max, x)


class Sample(NamedTuple):
    """The chosen token, its probability, and the confidence selected by ``alg``; all shaped like the rows."""

    token: jax.Array
    prob: jax.Array
    confidence: jax.Array


def sample(keys: jax.Array, logits: jax.Array, params: SamplingParams, needed: jax.Array | None = None) -> Sample:
    """Sample one token per row of logits [..., V]; ``keys`` (typed PRNG keys) has the row shape [...].

    Each row draws with its own key, so a row's result does not depend on which
    other rows share the call (batch composition, bucket padding). Rows outside
    ``needed`` (default: every row is needed) hold a sample no caller may read.
    """
    filtered = filter_logits(logits, params, needed)
    probs = jax.nn.softmax(filtered, axis=-1)
    greedy = _argmax(filtered)

    def draw(filtered: jax.Array) -> jax.Array:
        flat_keys = keys.reshape(-1)
        flat = filtered.reshape(-1, filtered.shape[-1])
        return jax.vmap(jax.random.categorical)(flat_keys, flat).reshape(filtered.shape[:-1]).astype(jnp.int32)

    drawing = _per_row(params.temperature, greedy.ndim) > 0
    token = jax.lax.cond(jnp.any(drawing), lambda f: jnp.where(drawing, draw(f), greedy), lambda f: greedy, filtered)
    prob = jnp.take_along_axis(probs, token[..., None], axis=-1)[..., 0]
    neg_entropy = jnp.sum(probs * jnp.log(probs + ENTROPY_EPS), axis=-1)
    # top-1 minus top-2 by two reductions (lax.top_k is ~10x slower on CPU here)
    best = _argmax(probs)[..., None]
    first = jnp.take_along_axis(probs, best, axis=-1)[..., 0]
    others = jnp.where(jnp.arange(probs.shape[-1]) == best, -jnp.inf, probs)
    margin = first - jnp.max(others, axis=-1)
    alg = _per_row(params.alg, prob.ndim)
    confidence = jnp.select([alg == 0, alg == 1], [neg_entropy, prob], margin)
    return Sample(token, prob, confidence)
