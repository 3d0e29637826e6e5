"""The attention rule of METHOD §2 evaluated from segment ids, in NumPy or jnp.

`allowed` works on NumPy and JAX arrays alike (only broadcasting and boolean
operators), unbatched ([L]) or batched ([B, L]), and with queries shorter than
keys (a KV cache). It is the exact dense reference every kernel is checked against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdjax.structure.segments import Segments


def allowed(q: Segments, k: Segments) -> Any:
    """[..., T, S] bool: query t may attend to key s.

    Queries and keys carry their own segment ids; a cached key keeps the ids it
    was written with.
    """
    same_doc = q.doc_id[..., :, None] == k.doc_id[..., None, :]
    same_block = (q.block_id[..., :, None] == k.block_id[..., None, :]) & (k.block_id[..., None, :] != 0)
    released = k.visible_from[..., None, :] <= q.position[..., :, None]
    return same_doc & (same_block | released)


def attention_mask(seg: Segments) -> np.ndarray:
    """[L, L] (or [B, L, L]) bool NumPy mask: m[i, j] = query i may attend to key j."""
    return np.asarray(allowed(Segments(*(np.asarray(a) for a in seg)), Segments(*(np.asarray(a) for a in seg))))
