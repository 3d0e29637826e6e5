"""`splash_dense`: jax's splash attention fed a dense per-example mask built from the segment ids.

The baseline the `pallas_tpu` kernel must beat. Splash's segment ids only test
equality, so the METHOD §2 rule can reach it only as a dynamic mask: a
[T, S] bool array per example in HBM (16 MiB at T = S = 4096), from which
splash builds its block-sparsity info at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention

from pdjax.attention.kernel_common import fit_block
from pdjax.attention.tiles import pad_segments, round_up
from pdjax.structure import Segments, allowed

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


def _splash_kernel(mask: jax.Array, block_sizes: splash_attention.BlockSizes, interpret: bool):
    """A splash MHA kernel for one example's [1, T, S] dynamic mask (shared by all heads)."""
    kernel = splash_attention.make_splash_mha_single_device(mask, block_sizes=block_sizes, interpret=interpret)
    # make_splash_* turns the python flag `is_dynamic_mask` into an array, which fails
    # under jit when the kernel checks it; it is only a name-scope/sharding switch.
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        info = getattr(kernel, name)
        if info is not None:
            setattr(kernel, name, info._replace(is_dynamic_mask=True))
    return kernel


def splash_dense_attention(
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
    """Segment-id attention through splash attention with a dense [B, T, S] mask; matches `reference_attention`.

    q [B, T, Nq, H], k/v [B, S, Nkv, H]; segment ids [B, T] / [B, S]. Rows with no
    allowed key are zeroed after the kernel (splash would average them).
    """
    b, t, nq, h = q.shape
    s = k.shape[1]
    bq, bkv = fit_block(block_q, t, interpret), fit_block(block_kv, s, interpret)
    tp, sp = round_up(t, bq), round_up(s, bkv)
    scale = h**-0.5 if scale is None else scale

    mask = allowed(pad_segments(q_seg, tp, keys=False), pad_segments(kv_seg, sp, keys=True))  # [B, Tp, Sp]
    block_sizes = splash_attention.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )

    def head_major(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    def one_example(mask_b, q_b, k_b, v_b):
        return _splash_kernel(mask_b[None], block_sizes, interpret)(q_b, k_b, v_b)

    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash applies no softmax scale
    out = jax.vmap(one_example)(mask, head_major(q_scaled, tp), head_major(k, sp), head_major(v, sp))
    out = jnp.where(mask.any(axis=-1)[:, None, :, None], out, 0).astype(q.dtype)
    return jnp.swapaxes(out, 1, 2)[:, :t]
