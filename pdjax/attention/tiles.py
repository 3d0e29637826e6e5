"""Tile planning for block-sparse segment-id attention (METHOD §2).

Before a kernel runs, every (query tile, key tile) pair is classified from the
per-tile minima and maxima of the segment ids:

- ``EMPTY``: no (query, key) pair in the tile can be allowed; the kernel neither
  loads nor computes it;
- ``FULL``: every pair is allowed; the kernel skips the mask;
- ``PARTIAL``: anything else; the kernel evaluates the rule per pair.

The classification is conservative: EMPTY and FULL are claimed only when the
bounds prove them, so a kernel that trusts them is exact. The same module
pads segment ids to whole tiles (padded rows and keys never match anything) and
reports how much work the plan skips against dense attention.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.structure import NEVER, Segments

# doc ids of padding added to reach whole tiles: distinct from each other and from
# every real doc id (>= 0), so a padded query sees nothing and a padded key is seen by none.
PAD_QUERY_DOC = -1
PAD_KEY_DOC = -2


class TileClass(enum.IntEnum):
    """What the rule leaves of one (query tile, key tile) pair."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def pad_segments(seg: Segments, length: int, *, keys: bool) -> Segments:
    """Segment ids [B, L] padded on the right to `length` with ids that match nothing.

    Padded queries get doc `PAD_QUERY_DOC`, padded keys doc `PAD_KEY_DOC` and
    `visible_from = NEVER`, so no padded pair is ever allowed and real pairs are unchanged.
    """
    extra = length - seg.position.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad segments of length {seg.position.shape[-1]} to {length}")
    if extra == 0:
        return seg
    fill = {
        "block_id": 0,
        "visible_from": NEVER if keys else 0,
        "position": 0,
        "doc_id": PAD_KEY_DOC if keys else PAD_QUERY_DOC,
        "role": 0,
    }
    widths = [(0, 0)] * (seg.position.ndim - 1) + [(0, extra)]
    return Segments(*(jnp.pad(jnp.asarray(getattr(seg, f)), widths, constant_values=fill[f]) for f in Segments._fields))


def _tile_bounds(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per-tile min and max of a [B, L] array cut into tiles of `block` (L % block == 0)."""
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return tiles.min(axis=-1), tiles.max(axis=-1)


def tile_classes(q_seg: Segments, kv_seg: Segments, block_q: int, block_kv: int) -> jax.Array:
    """int32 [B, T // block_q, S // block_kv] of `TileClass` values, from per-tile id bounds.

    Lengths must be multiples of the block sizes (see `pad_segments`).
    """
    t, s = q_seg.position.shape[-1], kv_seg.position.shape[-1]
    if t % block_q or s % block_kv:
        raise ValueError(f"lengths ({t}, {s}) must be multiples of the block sizes ({block_q}, {block_kv})")
    q_doc_lo, q_doc_hi = _tile_bounds(jnp.asarray(q_seg.doc_id), block_q)
    q_blk_lo, q_blk_hi = _tile_bounds(jnp.asarray(q_seg.block_id), block_q)
    q_pos_lo, q_pos_hi = _tile_bounds(jnp.asarray(q_seg.position), block_q)
    k_doc_lo, k_doc_hi = _tile_bounds(jnp.asarray(kv_seg.doc_id), block_kv)
    k_blk_lo, k_blk_hi = _tile_bounds(jnp.asarray(kv_seg.block_id), block_kv)
    k_vis_lo, k_vis_hi = _tile_bounds(jnp.asarray(kv_seg.visible_from), block_kv)

    def q_(x):  # query-tile bound as a column
        return x[..., :, None]

    def k_(x):  # key-tile bound as a row
        return x[..., None, :]

    # Some pair could share a doc / a nonzero block / have a released key.
    docs_meet = (q_(q_doc_lo) <= k_(k_doc_hi)) & (k_(k_doc_lo) <= q_(q_doc_hi))
    blocks_meet = jnp.maximum(jnp.maximum(q_(q_blk_lo), k_(k_blk_lo)), 1) <= jnp.minimum(q_(q_blk_hi), k_(k_blk_hi))
    some_released = k_(k_vis_lo) <= q_(q_pos_hi)
    # Every pair shares one doc / one nonzero block / has its key released.
    one_doc = (q_(q_doc_lo) == q_(q_doc_hi)) & (k_(k_doc_lo) == k_(k_doc_hi)) & (q_(q_doc_lo) == k_(k_doc_lo))
    one_block = (
        (q_(q_blk_lo) == q_(q_blk_hi))
        & (k_(k_blk_lo) == k_(k_blk_hi))
        & (q_(q_blk_lo) == k_(k_blk_lo))
        & (q_(q_blk_lo) != 0)
    )
    all_released = k_(k_vis_hi) <= q_(q_pos_lo)

    empty = ~docs_meet | ~(blocks_meet | some_released)
    full = one_doc & (one_block | all_released)
    return jnp.where(empty, TileClass.EMPTY, jnp.where(full, TileClass.FULL, TileClass.PARTIAL)).astype(jnp.int32)


def fetch_plan(classes: jax.Array) -> jax.Array:
    """int32 [..., R, C]: the column tile a kernel loads at step (r, c), visiting rows then columns.

    A visited (non-EMPTY) step loads its own column c. An EMPTY step repeats the
    block of the step before it, so the pipeline issues no new copy; EMPTY steps
    before the first visited one load the first visited column (needed next
    anyway), and 0 if nothing is visited.
    """
    *lead, rows, cols = classes.shape
    flat = classes.reshape(*lead, rows * cols) != TileClass.EMPTY
    step = jnp.arange(rows * cols, dtype=jnp.int32)
    last_seen = jax.lax.cummax(jnp.where(flat, step, -1), axis=flat.ndim - 1)
    big = rows * cols
    first_ahead = jax.lax.cummin(jnp.where(flat, step, big), axis=flat.ndim - 1, reverse=True)
    source = jnp.where(last_seen >= 0, last_seen, jnp.where(first_ahead < big, first_ahead, 0))
    return (source % cols).reshape(*lead, rows, cols).astype(jnp.int32)


def kernel_plan(classes: jax.Array) -> jax.Array:
    """The scalar-prefetch word per step: fetch index * 4 + tile class (one int32 keeps SMEM small)."""
    return fetch_plan(classes) * 4 + classes


@dataclasses.dataclass(frozen=True)
class TileReport:
    """Work of the block-sparse kernel against dense attention, summed over the batch."""

    tiles: int
    empty: int
    partial: int
    full: int
    dense_flops: int  # QK^T and PV of dense attention over the unpadded [T, S], all heads
    kernel_flops: int  # the same matmuls over the visited tiles only

    @property
    def visited_fraction(self) -> float:
        """Fraction of tiles the kernel loads and computes."""
        return (self.partial + self.full) / self.tiles

    @property
    def flops_saved(self) -> float:
        """1 - kernel FLOPs / dense FLOPs (negative when tile padding costs more than skipping saves)."""
        return 1.0 - self.kernel_flops / self.dense_flops


def tile_report(
    q_seg: Segments,
    kv_seg: Segments,
    block_q: int,
    block_kv: int,
    *,
    num_q_heads: int = 1,
    head_dim: int = 128,
) -> TileReport:
    """Tiles visited and FLOPs of the kernel's plan for these segment ids and block sizes.

    Segments are padded to whole tiles as the kernel pads them. FLOPs count the two
    matmuls (2 * T * S * H each per head); the backward pass visits the same tiles.
    """
    q_seg = Segments(*(jnp.atleast_2d(jnp.asarray(a)) for a in q_seg))
    kv_seg = Segments(*(jnp.atleast_2d(jnp.asarray(a)) for a in kv_seg))
    b, t = q_seg.position.shape
    s = kv_seg.position.shape[-1]
    classes = np.asarray(
        tile_classes(
            pad_segments(q_seg, round_up(t, block_q), keys=False),
            pad_segments(kv_seg, round_up(s, block_kv), keys=True),
            block_q,
            block_kv,
        )
    )
    counts = {c: int((classes == c).sum()) for c in TileClass}
    visited = counts[TileClass.PARTIAL] + counts[TileClass.FULL]
    per_pair = 4 * num_q_heads * head_dim
    return TileReport(
        tiles=int(classes.size),
        empty=counts[TileClass.EMPTY],
        partial=counts[TileClass.PARTIAL],
        full=counts[TileClass.FULL],
        dense_flops=per_pair * b * t * s,
        kernel_flops=per_pair * visited * block_q * block_kv,
    )
