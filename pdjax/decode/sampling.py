"""Sampling a token from logits, and the confidence of that choice (METHOD §4).

The order is the released decoder's: divide by the temperature (only when it
is > 0), keep the top-p nucleus, then the top-k, and take the softmax of what
is left. Greedy (temperature 0) takes the argmax. Every confidence is computed
from that filtered distribution:

- ``entropy``: negative entropy, sum p * log(p + 1e-10) (higher = more confident);
- ``maskgit_plus``: the probability of the chosen token (the max at temperature 0);
- ``topk_margin``: top-1 minus top-2 probability.

The knobs are traced values (a `SamplingParams` pytree), so changing them does
not recompile; the nucleus sort and the categorical draw are skipped with
`lax.cond` when no example needs them. Each knob is a scalar (one setting for
every row) or shaped like the rows' leading axes (one setting per row, as a
serving batch whose slots hold different requests): a row's result is the
same either way.
"""

from __future__ import annotations

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


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [..., V] / temperature (if > 0), with tokens outside the top-p nucleus and the top-k set to -inf."""
    logits = logits.astype(jnp.float32)
    temperature = _per_row(params.temperature, logits.ndim)
    logits = logits / jnp.where(temperature > 0, temperature, 1.0)
    needs_sort = (params.top_p < 1.0) | (params.top_k > 0)
    return jax.lax.cond(jnp.any(needs_sort), _nucleus_top_k, lambda x, p: x, logits, params)


def _nucleus_top_k(logits: jax.Array, params: SamplingParams) -> jax.Array:
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


class Sample(NamedTuple):
    """The chosen token, its probability, and the confidence selected by ``alg``; all shaped like the rows."""

    token: jax.Array
    prob: jax.Array
    confidence: jax.Array


def sample(keys: jax.Array, logits: jax.Array, params: SamplingParams) -> Sample:
    """Sample one token per row of logits [..., V]; ``keys`` (typed PRNG keys) has the row shape [...].

    Each row draws with its own key, so a row's result does not depend on which
    other rows share the call (batch composition, bucket padding).
    """
    filtered = filter_logits(logits, params)
    probs = jax.nn.softmax(filtered, axis=-1)
    greedy = jnp.argmax(filtered, axis=-1).astype(jnp.int32)

    def draw(filtered: jax.Array) -> jax.Array:
        flat_keys = keys.reshape(-1)
        flat = filtered.reshape(-1, filtered.shape[-1])
        return jax.vmap(jax.random.categorical)(flat_keys, flat).reshape(filtered.shape[:-1]).astype(jnp.int32)

    drawing = _per_row(params.temperature, greedy.ndim) > 0
    token = jax.lax.cond(jnp.any(drawing), lambda f: jnp.where(drawing, draw(f), greedy), lambda f: greedy, filtered)
    prob = jnp.take_along_axis(probs, token[..., None], axis=-1)[..., 0]
    neg_entropy = jnp.sum(probs * jnp.log(probs + ENTROPY_EPS), axis=-1)
    # top-1 minus top-2 by two reductions (lax.top_k is ~10x slower on CPU here)
    best = jnp.argmax(probs, axis=-1)[..., None]
    first = jnp.take_along_axis(probs, best, axis=-1)[..., 0]
    others = jnp.where(jnp.arange(probs.shape[-1]) == best, -jnp.inf, probs)
    margin = first - jnp.max(others, axis=-1)
    alg = _per_row(params.alg, prob.ndim)
    confidence = jnp.select([alg == 0, alg == 1], [neg_entropy, prob], margin)
    return Sample(token, prob, confidence)
