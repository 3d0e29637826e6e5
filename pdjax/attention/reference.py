"""Exact segment-id attention in plain jnp: the `xla` implementation and the reference for kernels.

Grouped-query attention without repeating K/V: queries are viewed as
[B, T, K, G, H] (K kv-heads, G query heads per kv-head). The softmax runs in
float32; a query row with no allowed key returns zeros rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdjax.structure import Segments, allowed


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: Segments,
    kv_seg: Segments,
    *,
    scale: float | None = None,
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
