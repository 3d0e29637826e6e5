"""Exact segment-id attention in plain jnp: the `xla` implementation and the reference for kernels.

Grouped-query attention without repeating K/V: queries are viewed as
[B, T, K, G, H] (K kv-heads, G query heads per kv-head). The softmax runs in
float32; a query row with no allowed key returns zeros rather than NaN.

With ``score_bytes`` (the model's cached calls pass `SCORE_BYTES`), long queries
over long keys are taken a block of queries at a time (`lax.map`), so that the
float32 scores of one call stay under it: a decoder's 2,048-wide window of 8 rows
over a 2,049-slot cache would otherwise hold 3.5 GiB of scores for Dream-7B. Each
query row's softmax is computed alike either way. (Training keeps whole rows: its
backward pass would store every block's scores anyway, and under a mesh the shapes
here are global, not a chip's.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdjax.structure import Segments, allowed

SCORE_BYTES = 2**28  # a decoding call's float32 scores [B, Nq, T, S] stay below this (256 MiB)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: Segments,
    kv_seg: Segments,
    *,
    scale: float | None = None,
    score_bytes: int | None = None,
) -> jax.Array:
    """softmax(q k^T * scale, masked by the METHOD §2 rule) v.

    q: [B, T, Nq, H]; k, v: [B, S, Nkv, H] with Nq % Nkv == 0; segment ids [B, T] / [B, S].
    Returns [B, T, Nq, H] in q's dtype.
    """
    b, t, nq, h = q.shape
    nkv = k.shape[2]
    if nq % nkv:
        raise ValueError(f"query heads ({nq}) must be a multiple of kv heads ({nkv})")
    scale = h**-0.5 if scale is None else scale
    block = t if score_bytes is None else query_block(b, t, nq, k.shape[1], score_bytes)
    if block >= t:
        return _attend(q, k, v, q_seg, kv_seg, scale)
    # whole blocks of queries (the padding queries' rows are computed, then cut off)
    pad = -t % block
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, block, nq, h).swapaxes(0, 1)
    seg_blocks = Segments(*(jnp.pad(a, ((0, 0), (0, pad))).reshape(b, -1, block).swapaxes(0, 1) for a in q_seg))
    out = jax.lax.map(lambda x: _attend(x[0], k, v, x[1], kv_seg, scale), (q_blocks, seg_blocks))
    return out.swapaxes(0, 1).reshape(b, t + pad, nq, h)[:, :t]


def query_block(batch: int, queries: int, heads: int, keys: int, score_bytes: int = SCORE_BYTES) -> int:
    """Queries per block: all of them when their scores fit `score_bytes`, else the largest power of two (>= 8)
    whose scores do (8 when even 8 queries' scores do not: many rows over a long cache)."""
    per_query = batch * heads * keys * 4
    if queries * per_query <= score_bytes:
        return queries
    return max(8, 1 << max(0, (score_bytes // per_query).bit_length() - 1))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: Segments, kv_seg: Segments, scale: float) -> jax.Array:
    b, t, nq, h = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, t, nkv, nq // nkv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = allowed(q_seg, kv_seg)[:, None, None, :, :]  # [B, 1, 1, T, S]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, nq, h).astype(q.dtype)
