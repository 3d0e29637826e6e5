"""Backward Pallas TPU kernels (dq, and dk/dv) with the forward's tile skipping.

Both recompute p = exp(s - lse) per visited tile from the forward's
log-sum-exp; masked entries (and rows with no allowed key) give p = 0, so their
gradients are exactly zero. dq walks key tiles per query tile like the forward.
dk/dv walk, per key tile, every query head of its group and every query tile,
summing the group's contributions in VMEM: K/V gradients of grouped-query
attention without repeating K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pdjax.attention.kernel_common import (
    NT_DIMS,
    NUM_LANES,
    NUM_SUBLANES,
    KernelConfig,
    lanes,
    query_major_maps,
    tile_mask,
)
from pdjax.attention.tiles import TileClass


def _probabilities_and_ds(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, lse_ref, di_ref, do_ref, *, scale, masked):
    """p and dS = p * (dP - D) of one tile, both [bq, bkv] f32 (dS without the softmax scale)."""
    block_kv = k_ref.shape[0]
    s = jax.lax.dot_general(q_ref[...], k_ref[...], NT_DIMS, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lanes(lse_ref[...], block_kv))
    if masked:
        p = jnp.where(tile_mask(q_ids_ref, kv_ids_ref), p, 0.0)
    v = v_ref[...]
    dp = jax.lax.dot_general(do_ref[...].astype(v.dtype), v, NT_DIMS, preferred_element_type=jnp.float32)
    ds = p * (dp - lanes(di_ref[...], block_kv))
    return p, ds


def _dq_kernel(
    plan_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    kv_ids_ref,
    lse_ref,
    di_ref,
    do_ref,
    dq_ref,
    dq_acc_ref,
    *,
    scale: float,
    num_kv_tiles: int,
):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    tile_class = plan_ref[b, i, j] & 3

    @pl.when(j == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros_like(dq_acc_ref)

    def accumulate(masked: bool):
        _, ds = _probabilities_and_ds(
            q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, lse_ref, di_ref, do_ref, scale=scale, masked=masked
        )
        k = k_ref[...]
        dq_acc_ref[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    pl.when(tile_class == TileClass.PARTIAL)(lambda: accumulate(masked=True))
    pl.when(tile_class == TileClass.FULL)(lambda: accumulate(masked=False))

    @pl.when(j == num_kv_tiles - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    plan_t_ref,
    q_ref,
    k_ref,
    v_ref,
    q_ids_ref,
    kv_ids_ref,
    lse_ref,
    di_ref,
    do_ref,
    dk_ref,
    dv_ref,
    dk_acc_ref,
    dv_acc_ref,
    *,
    scale: float,
    group: int,
    num_q_tiles: int,
):
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    tile_class = plan_t_ref[b, j, i] & 3

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
        dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

    def accumulate(masked: bool):
        p, ds = _probabilities_and_ds(
            q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, lse_ref, di_ref, do_ref, scale=scale, masked=masked
        )
        do = do_ref[...]
        q = q_ref[...]
        dv_acc_ref[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_acc_ref[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    pl.when(tile_class == TileClass.PARTIAL)(lambda: accumulate(masked=True))
    pl.when(tile_class == TileClass.FULL)(lambda: accumulate(masked=False))

    @pl.when((g == group - 1) & (i == num_q_tiles - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_ids: jax.Array,
    kv_ids: jax.Array,
    plan: jax.Array,
    plan_t: jax.Array,
    lse: jax.Array,
    di: jax.Array,
    do: jax.Array,
    cfg: KernelConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """dq [B, Nq, T, H], dk and dv [B, Nkv, S, H] for head-major inputs.

    lse and di = rowsum(o * do) are [B, Nq, T, 128] f32 (lane-replicated);
    plan [B, T/bq, S/bkv] and plan_t [B, S/bkv, T/bq] come from `tiles.kernel_plan`
    of the tile classes and of their transpose.
    """
    b, nq, t, h = q.shape
    nkv, s = k.shape[1], k.shape[2]
    group = nq // nkv
    bq, bkv = cfg.block_q, cfg.block_kv
    num_q_tiles, num_kv_tiles = t // bq, s // bkv
    params = dict(interpret=cfg.interpret)

    # dq: grid (batch, query head, query tile, key tile), as the forward.
    q_map, kv_map, q_ids_map, kv_ids_map = query_major_maps(group)

    row = pl.BlockSpec((None, None, bq, NUM_LANES), q_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=cfg.scale, num_kv_tiles=num_kv_tiles),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, nq, num_q_tiles, num_kv_tiles),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), q_map),
                pl.BlockSpec((None, None, bkv, h), kv_map),
                pl.BlockSpec((None, None, bkv, h), kv_map),
                pl.BlockSpec((None, NUM_SUBLANES, bq), q_ids_map),
                pl.BlockSpec((None, NUM_SUBLANES, bkv), kv_ids_map),
                row,
                row,
                pl.BlockSpec((None, None, bq, h), q_map),
            ],
            out_specs=pl.BlockSpec((None, None, bq, h), q_map),
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        name="pdjax_segment_attention_dq",
        **params,
    )(plan, q, k, v, q_ids, kv_ids, lse, di, do)

    # dk/dv: grid (batch, kv head, key tile, query head in group, query tile).
    def qt_map(bi, ki, j, g, i, plan_ref):
        return bi, ki * group + g, plan_ref[bi, j, i] >> 2, 0

    def kt_map(bi, ki, j, g, i, plan_ref):
        return bi, ki, j, 0

    def qt_ids_map(bi, ki, j, g, i, plan_ref):
        return bi, 0, plan_ref[bi, j, i] >> 2

    def kt_ids_map(bi, ki, j, g, i, plan_ref):
        return bi, 0, j

    row_t = pl.BlockSpec((None, None, bq, NUM_LANES), qt_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=cfg.scale, group=group, num_q_tiles=num_q_tiles),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, nkv, num_kv_tiles, group, num_q_tiles),
            in_specs=[
                pl.BlockSpec((None, None, bq, h), qt_map),
                pl.BlockSpec((None, None, bkv, h), kt_map),
                pl.BlockSpec((None, None, bkv, h), kt_map),
                pl.BlockSpec((None, NUM_SUBLANES, bq), qt_ids_map),
                pl.BlockSpec((None, NUM_SUBLANES, bkv), kt_ids_map),
                row_t,
                row_t,
                pl.BlockSpec((None, None, bq, h), qt_map),
            ],
            out_specs=[pl.BlockSpec((None, None, bkv, h), kt_map), pl.BlockSpec((None, None, bkv, h), kt_map)],
            scratch_shapes=[pltpu.VMEM((bkv, h), jnp.float32), pltpu.VMEM((bkv, h), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        name="pdjax_segment_attention_dkv",
        **params,
    )(plan_t, q, k, v, q_ids, kv_ids, lse, di, do)
    return dq, dk, dv
