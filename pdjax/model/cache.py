"""Fixed-shape KV cache addressed by position (design.md, "Model and KV cache").

Slot s of an example holds the keys/values and segment ids of that example's
token at position s; there is no left padding and every example may be at a
different offset. Writing a slot again overwrites it, which is how a denoising
round rewrites its group and the commit pass stores the final keys/values.
Empty slots have ``visible_from = NEVER`` and ``block_id = 0``, so the segment
rule never lets a query see them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.structure import NEVER, Role, Segments

if TYPE_CHECKING:
    from pdjax.model.config import DreamConfig


class KVCache(NamedTuple):
    """k, v: [num_layers, B, S, Nkv * H]; segments: `Segments` of [B, S] int32 arrays (a JAX pytree).

    A slot's heads are one row of Nkv * H values, so a write is whole rows and the TPU compiler keeps one
    layout for the cache everywhere (with [..., Nkv, H] minor dimensions it tiled the scatter's operand
    otherwise than the loop's and copied the whole cache, twice per compiled call width).
    """

    k: jax.Array
    v: jax.Array
    segments: Segments

    @property
    def max_length(self) -> int:
        return int(self.k.shape[2])


def init_cache(config: "DreamConfig", batch: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` examples of up to `max_length` positions (dtype: the compute dtype)."""
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    shape = (config.num_layers, batch, max_length, config.num_kv_heads * config.head_dim)
    slots = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))
    zeros = jnp.zeros((batch, max_length), jnp.int32)
    segments = Segments(
        block_id=zeros,
        visible_from=jnp.full((batch, max_length), NEVER, jnp.int32),
        position=slots,
        doc_id=zeros,
        role=jnp.full((batch, max_length), int(Role.PADDING), jnp.int32),
    )
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), segments)


def _scatter_rows(dest: jax.Array, position: jax.Array, values: jax.Array) -> jax.Array:
    """dest[b, position[b, t]] = values[b, t]; positions outside [0, S) are dropped."""
    rows = jnp.arange(dest.shape[0])[:, None]
    return dest.at[rows, position].set(values.astype(dest.dtype), mode="drop")


def write_segments(cache_segments: Segments, segments: Segments) -> Segments:
    """The cache's segment ids with the new tokens' ids written at their positions."""
    position = jnp.asarray(segments.position, jnp.int32)
    return Segments(
        *(
            _scatter_rows(old, position, jnp.asarray(new, jnp.int32))
            for old, new in zip(cache_segments, segments)
        )
    )


def write_kv(stack: jax.Array, layer: jax.Array, position: jax.Array, new: jax.Array) -> jax.Array:
    """The cache of every layer [L, B, S, Nkv * H] with new keys or values [B, T, Nkv, H] of `layer` written at
    position [B, T] (in place under jit; positions outside [0, S) are dropped)."""
    b, t = position.shape
    rows = jnp.arange(stack.shape[1])[:, None]
    return stack.at[layer, rows, position].set(new.reshape(b, t, -1).astype(stack.dtype), mode="drop")


def read_kv(stack: jax.Array, layer: jax.Array, num_kv_heads: int) -> jax.Array:
    """One layer's keys or values [B, S, Nkv, H] from the stack [L, B, S, Nkv * H]."""
    one = jax.lax.dynamic_index_in_dim(stack, layer, 0, keepdims=False)
    return one.reshape(*one.shape[:-1], num_kv_heads, -1)


def cache_bytes(config: "DreamConfig", batch: int, max_length: int, dtype: Any = None) -> int:
    """Memory of a cache's k and v arrays, to size decoding batches."""
    dtype = config.dtype if dtype is None else dtype
    return 2 * config.num_layers * batch * max_length * config.num_kv_heads * config.head_dim * np.dtype(dtype).itemsize
