"""The one attention entry point of pdjax, with implementations selected by name.

``xla`` (exact reference, default on CPU/GPU) is always available; the kernels
``pallas_tpu`` (block-sparse Pallas TPU kernel computing the rule from segment
ids) and ``splash_dense`` (jax's splash attention fed a dense mask, the
baseline) are registered in `IMPLEMENTATIONS` and must match it. Both kernels
take ``block_q``, ``block_kv`` and ``interpret`` options.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax

from pdjax.attention.kernel import pallas_attention
from pdjax.attention.reference import reference_attention
from pdjax.attention.splash import splash_dense_attention
from pdjax.structure import Segments


class AttentionFn(Protocol):
    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: Segments, kv_seg: Segments, *, scale: float | None = None
    ) -> jax.Array: ...


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": reference_attention,
    "pallas_tpu": pallas_attention,
    "splash_dense": splash_dense_attention,
}


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: Segments,
    kv_seg: Segments,
    *,
    impl: str = "xla",
    scale: float | None = None,
    **options,
) -> jax.Array:
    """Segment-id attention: q [B, T, Nq, H] over k, v [B, S, Nkv, H] (S >= T when k/v is a KV cache).

    `q_seg` / `kv_seg` are `Segments` with [B, T] / [B, S] arrays (their `role` is unused).
    `options` go to the implementation (e.g. block sizes of a kernel).
    """
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {sorted(IMPLEMENTATIONS)}") from None
    return fn(q, k, v, q_seg, kv_seg, scale=scale, **options)
