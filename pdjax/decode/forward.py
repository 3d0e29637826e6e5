"""The decoder's view of a model: a pure forward to hidden states, the LM head, its parameters, and a KV cache.

The decoder never touches NNX modules inside its loop: `model_forward` splits a
`DreamModel` once and returns pure functions that merge the parameters back
inside the traced code (the NNX performance guide's pattern). The forward and
the head are apart so that the decoder computes logits only where it samples:
one row per AR step and the masked positions of a denoising window, a chunk at
a time, never [window, vocabulary] for every position of a wide call. Tests
wrap these functions to add scripted logits.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

from pdjax.structure import Segments


class HiddenFn(Protocol):
    """``(params, tokens [B, T], segments [B, T], cache) -> (hidden [B, T, D], cache)``.

    ``hidden[:, i]`` is the final hidden state at i (its logits predict token i + 1, unshifted); the T
    new keys/values are written into the cache at ``segments.position`` (design.md, "Model and KV cache").
    """

    def __call__(self, params: Any, tokens: jax.Array, segments: Segments, cache: Any) -> tuple[jax.Array, Any]: ...


class HeadFn(Protocol):
    """``(params, hidden [N, D], row [N], position [N]) -> logits [N, V] float32``.

    ``row`` and ``position`` say which batch row and sequence position each hidden state comes from;
    a model's head ignores them (tests' scripted logits use them).
    """

    def __call__(self, params: Any, hidden: jax.Array, row: jax.Array, position: jax.Array) -> jax.Array: ...


class CacheFn(Protocol):
    """``(batch, length) -> cache``: an empty position-addressed KV cache (traced inside the decoder)."""

    def __call__(self, batch: int, length: int) -> Any: ...


class Forward(NamedTuple):
    """What the decoder needs from a model: the pure forward, its parameters, a cache factory, and the head."""

    apply: HiddenFn
    params: Any
    make_cache: CacheFn
    head: HeadFn


def model_forward(model: Any) -> Forward:
    """A `Forward` for an NNX `DreamModel`: `nnx.split` once, `nnx.merge` inside the pure functions."""
    from flax import nnx

    from pdjax.model import init_cache

    graphdef, params = nnx.split(model)
    config = model.config

    def apply(params: Any, tokens: jax.Array, segments: Segments, cache: Any) -> tuple[jax.Array, Any]:
        return nnx.merge(graphdef, params).hidden(tokens, segments, cache=cache)

    def head(params: Any, hidden: jax.Array, row: jax.Array, position: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).head(hidden)

    def make_cache(batch: int, length: int) -> Any:
        return init_cache(config, batch, length)

    return Forward(apply, params, make_cache, head)


def full_logits(forward: Forward, params: Any, tokens: jax.Array, segments: Segments, cache: Any = None
                ) -> tuple[jax.Array, Any]:
    """logits [B, T, V] float32 at every position (Dream's own sampler reads them all) and the updated cache."""
    hidden, cache = forward.apply(params, tokens, segments, cache)
    b, t, d = hidden.shape
    row = jax.numpy.broadcast_to(jax.numpy.arange(b, dtype=jax.numpy.int32)[:, None], (b, t))
    logits = forward.head(params, hidden.reshape(b * t, d), row.reshape(-1), segments.position.reshape(-1))
    return logits.reshape(b, t, -1), cache
