"""What the Pallas TPU attention kernels share: segment-id layout, the in-tile rule, lane helpers.

Segment ids reach the kernels as int32 rows [B, 8, L] (one (8, 128)-tiled
array per side, 32 bytes a token): queries carry (block_id, doc_id, position)
in rows 0-2, keys (block_id, doc_id, visible_from), the only fields the rule
reads on each side. A kernel step loads an [8, bq] query block and an [8, bkv]
key block, turns the query block into columns with one small transpose, and
compares columns against rows: the rule per pair, with no [T, S] array anywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

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


class QueryMajorMaps(NamedTuple):
    """Block index maps of a (batch, query head, query tile, key tile) grid with a scalar-prefetched plan.

    The plan word of a (query tile, key tile) holds the key tile to fetch in its
    high bits (an EMPTY tile re-names the block already loaded, so no copy is issued).
    """

    q: Callable
    kv: Callable
    q_ids: Callable
    kv_ids: Callable


def query_major_maps(group: int) -> QueryMajorMaps:
    """Index maps shared by the forward and dq kernels; `group` query heads share one kv head."""

    def q_map(bi, hi, i, j, plan_ref):
        return bi, hi, i, 0

    def kv_map(bi, hi, i, j, plan_ref):
        return bi, jax.lax.div(hi, group), plan_ref[bi, i, j] >> 2, 0

    def q_ids_map(bi, hi, i, j, plan_ref):
        return bi, 0, i

    def kv_ids_map(bi, hi, i, j, plan_ref):
        return bi, 0, plan_ref[bi, i, j] >> 2

    return QueryMajorMaps(q_map, kv_map, q_ids_map, kv_ids_map)


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


def _rows(fields: list) -> jax.Array:
    """int32 [B, 8, L]: the given [B, L] fields in the first rows, zeros below (a whole sublane tile)."""
    rows = jnp.stack(fields, axis=1).astype(jnp.int32)
    return jnp.pad(rows, ((0, 0), (0, NUM_SUBLANES - rows.shape[1]), (0, 0)))


def query_ids(seg: Segments) -> jax.Array:
    """int32 [B, 8, T]: rows (block_id, doc_id, position) of the queries."""
    return _rows([seg.block_id, seg.doc_id, seg.position])


def key_ids(seg: Segments) -> jax.Array:
    """int32 [B, 8, S]: rows (block_id, doc_id, visible_from) of the keys."""
    return _rows([seg.block_id, seg.doc_id, seg.visible_from])


def lanes(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated [rows, 128] array as [rows, width] (tiled, or cut for small interpret blocks)."""
    if width % NUM_LANES == 0:
        return jnp.tile(x, (1, width // NUM_LANES))
    if width < NUM_LANES:
        return x[:, :width]
    raise ValueError(f"width {width} must be a multiple of {NUM_LANES} or smaller than it")


def tile_mask(q_ids_ref, kv_ids_ref) -> jax.Array:
    """bool [bq, bkv]: the METHOD §2 rule for the query block [8, bq] and key block [8, bkv] in VMEM."""
    q = q_ids_ref[...].T  # [bq, 8]: the query fields as columns
    q_block, q_doc, q_pos = q[:, 0:1], q[:, 1:2], q[:, 2:3]
    k = kv_ids_ref[...]
    k_block, k_doc, k_visible = k[0:1, :], k[1:2, :], k[2:3, :]
    same_block = (q_block == k_block) & (k_block != 0)
    return (q_doc == k_doc) & (same_block | (k_visible <= q_pos))
