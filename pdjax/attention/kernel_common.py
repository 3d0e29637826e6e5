"""What the Pallas TPU attention kernels share: segment-id layouts, the in-tile rule, lane helpers.

Segment ids reach the kernels as splash attention passes its segment ids: query
ids lane-replicated ([B, 3, T, 128]: a query tile is a [bq, 128] column block)
and key ids sublane-replicated ([B, 3, 8, S]: a key tile is an [8, bkv] row
block), so the rule is a broadcast compare of a column against a row with no
transpose and no [T, S] array. Queries carry (block_id, doc_id, position), keys
(block_id, doc_id, visible_from): the only fields the rule reads on each side.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pdjax.attention.tiles import round_up
from pdjax.structure import Segments

NUM_LANES = 128
NUM_SUBLANES = 8
# Finite "minus infinity" for masked logits and the running max: exp() of
# differences stays finite, and masked entries are zeroed explicitly after exp.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Stored as the log-sum-exp of a row with no allowed key: exp(s - EMPTY_ROW_LSE) is 0.
EMPTY_ROW_LSE = -MASK_VALUE
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T without materialising b.T


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static parameters of one kernel call (hashable: used as a custom_vjp non-diff argument)."""

    scale: float
    block_q: int
    block_kv: int
    interpret: bool


def fit_block(requested: int, length: int, interpret: bool) -> int:
    """The tile size used for a sequence of `length`: at most `requested`, no bigger than the padded length.

    TPU tiles are multiples of 128 (lanes); the interpreter also takes multiples of 8.
    """
    align = 8 if interpret else NUM_LANES
    if requested % align:
        raise ValueError(
            f"block size {requested} must be a multiple of {align}"
            + ("" if interpret else " on TPU (smaller multiples of 8 only with interpret=True)")
        )
    return min(requested, round_up(length, align))


def query_ids(seg: Segments) -> jax.Array:
    """int32 [B, 3, T, 128]: (block_id, doc_id, position) of each query, replicated over lanes."""
    fields = jnp.stack([seg.block_id, seg.doc_id, seg.position], axis=1).astype(jnp.int32)
    return jnp.broadcast_to(fields[..., None], (*fields.shape, NUM_LANES))


def key_ids(seg: Segments) -> jax.Array:
    """int32 [B, 3, 8, S]: (block_id, doc_id, visible_from) of each key, replicated over sublanes."""
    fields = jnp.stack([seg.block_id, seg.doc_id, seg.visible_from], axis=1).astype(jnp.int32)
    b, f, s = fields.shape
    return jnp.broadcast_to(fields[:, :, None, :], (b, f, NUM_SUBLANES, s))


def lanes(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated [rows, 128] array as [rows, width] (tiled, or cut for small interpret blocks)."""
    if width % NUM_LANES == 0:
        return jnp.tile(x, (1, width // NUM_LANES))
    if width < NUM_LANES:
        return x[:, :width]
    raise ValueError(f"width {width} must be a multiple of {NUM_LANES} or smaller than it")


def tile_mask(q_ids_ref, kv_ids_ref, block_kv: int) -> jax.Array:
    """bool [bq, bkv]: the METHOD §2 rule for the query tile and key tile in VMEM."""
    q_block = lanes(q_ids_ref[0], block_kv)
    q_doc = lanes(q_ids_ref[1], block_kv)
    q_pos = lanes(q_ids_ref[2], block_kv)
    k_block = kv_ids_ref[0, :1, :]
    k_doc = kv_ids_ref[1, :1, :]
    k_visible = kv_ids_ref[2, :1, :]
    same_block = (q_block == k_block) & (k_block != 0)
    return (q_doc == k_doc) & (same_block | (k_visible <= q_pos))
