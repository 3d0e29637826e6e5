"""`pallas_tpu`: block-sparse segment-id attention as Pallas TPU kernels, differentiable via custom_vjp.

The wrapper pads queries and keys to whole tiles (padding matches nothing),
plans the tiles from the segment ids (`tiles.py`), lays the ids out for the
kernels (`kernel_common.py`) and runs the forward (`kernel_fwd.py`) or, under
autodiff, forward with log-sum-exp and the dq / dk-dv kernels (`kernel_bwd.py`).
Same contract as the `xla` reference: bf16 or f32 in, f32 softmax and
accumulation, rows with no allowed key return zeros and zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pdjax.attention import kernel_bwd, kernel_fwd
from pdjax.attention.kernel_common import NUM_LANES, KernelConfig, fit_block, key_ids, query_ids
from pdjax.attention.tiles import kernel_plan, pad_segments, round_up, tile_classes
from pdjax.structure import Segments

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attend(q, k, v, q_ids, kv_ids, plan, plan_t, cfg: KernelConfig):
    out, _ = kernel_fwd.forward(q, k, v, q_ids, kv_ids, plan, cfg, save_lse=False)
    return out


def _attend_fwd(q, k, v, q_ids, kv_ids, plan, plan_t, cfg: KernelConfig):
    out, lse = kernel_fwd.forward(q, k, v, q_ids, kv_ids, plan, cfg, save_lse=True)
    return out, (q, k, v, q_ids, kv_ids, plan, plan_t, out, lse)


def _attend_bwd(cfg: KernelConfig, residuals, do):
    q, k, v, q_ids, kv_ids, plan, plan_t, out, lse = residuals
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    di = jnp.broadcast_to(di[..., None], (*di.shape, NUM_LANES))
    dq, dk, dv = kernel_bwd.backward(q, k, v, q_ids, kv_ids, plan, plan_t, lse, di, do, cfg)
    return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: Segments,
    kv_seg: Segments,
    *,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV,
    interpret: bool = False,
) -> jax.Array:
    """Segment-id attention (METHOD §2) as a block-sparse Pallas TPU kernel; matches `reference_attention`.

    q [B, T, Nq, H], k/v [B, S, Nkv, H]; segment ids [B, T] / [B, S]. Block sizes
    are upper bounds (shrunk to the padded length); on TPU they must be multiples
    of 128. `interpret=True` runs the kernels in the Pallas interpreter (CPU tests).
    """
    b, t, nq, h = q.shape
    s, nkv = k.shape[1], k.shape[2]
    if nq % nkv:
        raise ValueError(f"query heads ({nq}) must be a multiple of kv heads ({nkv})")
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    bq, bkv = fit_block(block_q, t, interpret), fit_block(block_kv, s, interpret)
    tp, sp = round_up(t, bq), round_up(s, bkv)
    cfg = KernelConfig(scale=float(h**-0.5 if scale is None else scale), block_q=bq, block_kv=bkv, interpret=interpret)

    q_seg = pad_segments(q_seg, tp, keys=False)
    kv_seg = pad_segments(kv_seg, sp, keys=True)
    classes = tile_classes(q_seg, kv_seg, bq, bkv)
    plan = kernel_plan(classes)
    plan_t = kernel_plan(jnp.swapaxes(classes, 1, 2))

    def head_major(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    out = _attend(
        head_major(q, tp), head_major(k, sp), head_major(v, sp), query_ids(q_seg), key_ids(kv_seg), plan, plan_t, cfg
    )
    return jnp.swapaxes(out, 1, 2)[:, :t]
