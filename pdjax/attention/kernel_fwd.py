"""Forward Pallas TPU kernel: flash attention with online softmax over the tiles the plan visits.

Grid (batch, query head, query tile, key tile). The scalar-prefetched plan word
of each step says which key tile to load (an EMPTY step repeats the previous
block, so no copy is issued) and the tile class: EMPTY steps do nothing, FULL
steps skip the mask, PARTIAL steps evaluate the rule from the segment ids.
K/V are indexed by query head // group size, never repeated in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pdjax.attention.kernel_common import (
    EMPTY_ROW_LSE,
    MASK_VALUE,
    NT_DIMS,
    NUM_LANES,
    NUM_SUBLANES,
    KernelConfig,
    lanes,
    query_major_maps,
    tile_mask,
)
from pdjax.attention.tiles import TileClass


def _forward_kernel(
    plan_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    kv_ids_ref,
    o_ref,
    *rest,
    scale: float,
    num_kv_tiles: int,
    save_lse: bool,
):
    if save_lse:
        lse_ref, m_ref, l_ref, acc_ref = rest
    else:
        lse_ref, (m_ref, l_ref, acc_ref) = None, rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    tile_class = plan_ref[b, i, j] & 3
    block_kv = k_ref.shape[0]
    head_dim = acc_ref.shape[1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def accumulate(masked: bool):
        s = jax.lax.dot_general(q_ref[...], k_ref[...], NT_DIMS, preferred_element_type=jnp.float32) * scale
        if masked:
            mask = tile_mask(q_ids_ref, kv_ids_ref)
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])  # [bq, 128], lanes equal
        p = jnp.exp(s - lanes(m_next, block_kv))
        if masked:  # a row with nothing allowed yet has m == MASK_VALUE and exp(0) == 1
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1)[:, None]
        m_ref[...] = m_next
        v = v_ref[...]
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = lanes(alpha, head_dim) * acc_ref[...] + pv

    pl.when(tile_class == TileClass.PARTIAL)(lambda: accumulate(masked=True))
    pl.when(tile_class == TileClass.FULL)(lambda: accumulate(masked=False))

    @pl.when(j == num_kv_tiles - 1)
    def _finish():
        l = l_ref[...]
        seen = l > 0.0  # rows with no allowed key keep l == 0 and return zeros
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_ref[...] = (acc_ref[...] * lanes(inv, head_dim)).astype(o_ref.dtype)
        if lse_ref is not None:
            lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_ROW_LSE)


def forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_ids: jax.Array,
    kv_ids: jax.Array,
    plan: jax.Array,
    cfg: KernelConfig,
    *,
    save_lse: bool,
) -> tuple[jax.Array, jax.Array | None]:
    """o [B, Nq, T, H] (and the log-sum-exp [B, Nq, T, 128] f32 when `save_lse`).

    q [B, Nq, T, H], k/v [B, Nkv, S, H] head-major; ids from `query_ids`/`key_ids`;
    plan [B, T/bq, S/bkv] from `tiles.kernel_plan`.
    """
    b, nq, t, h = q.shape
    nkv, s = k.shape[1], k.shape[2]
    group = nq // nkv
    bq, bkv = cfg.block_q, cfg.block_kv
    num_q_tiles, num_kv_tiles = t // bq, s // bkv

    q_map, kv_map, q_ids_map, kv_ids_map = query_major_maps(group)

    in_specs = [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bkv, h), kv_map),
        pl.BlockSpec((None, None, bkv, h), kv_map),
        pl.BlockSpec((None, NUM_SUBLANES, bq), q_ids_map),
        pl.BlockSpec((None, NUM_SUBLANES, bkv), kv_ids_map),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, h), q_map)]
    out_shape = [jax.ShapeDtypeStruct((b, nq, t, h), q.dtype)]
    if save_lse:
        out_specs.append(pl.BlockSpec((None, None, bq, NUM_LANES), q_map))
        out_shape.append(jax.ShapeDtypeStruct((b, nq, t, NUM_LANES), jnp.float32))
    kernel = functools.partial(_forward_kernel, scale=cfg.scale, num_kv_tiles=num_kv_tiles, save_lse=save_lse)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, nq, num_q_tiles, num_kv_tiles),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running max
                pltpu.VMEM((bq, NUM_LANES), jnp.float32),  # running sum
                pltpu.VMEM((bq, h), jnp.float32),  # output accumulator
            ],
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="pdjax_segment_attention_fwd",
    )(plan, q, k, v, q_ids, kv_ids)
    return outs[0], (outs[1] if save_lse else None)
