"""Stateless pieces of the Qwen2 block: RMSNorm, rotary embeddings, parameter creation.

Norms and rotary phases run in float32 whatever the compute dtype (the dtype
policy of `DreamConfig`); results are cast back to the compute dtype.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """weight * x / rms(x) over the last axis, in float32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * xf).astype(x.dtype)


def rope_tables(position: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim/2] (float32) of the rotary embedding at integer positions [B, T]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angle = position.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, H] by the tables [B, T, H/2]: Qwen2's half-split (not interleaved) layout."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def param(
    init: Callable[..., jax.Array],
    rngs: nnx.Rngs,
    shape: Sequence[int],
    dtype: jnp.dtype,
    names: Sequence[str | None],
) -> nnx.Param:
    """A parameter tagged with its logical axis names (sharding is applied by the caller, not eagerly)."""
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for a {len(shape)}-d shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names), eager_sharding=False)


def normal(stddev: float = 0.02) -> Callable[..., jax.Array]:
    """Qwen2's weight initialiser: N(0, stddev)."""
    return jax.nn.initializers.normal(stddev)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
