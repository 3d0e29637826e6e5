"""The decoder's view of a model: a pure forward function, its parameters, and an empty KV cache.

The decoder never touches NNX modules inside its loop: `model_forward` splits a
`DreamModel` once and returns a pure function that merges the parameters back
inside the traced code (the NNX performance guide's pattern). Tests wrap such
a function to add scripted logits.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

from pdjax.structure import Segments


class LogitsFn(Protocol):
    """``(params, tokens [B, T], segments [B, T], cache) -> (logits [B, T, V] float32, cache)``.

    ``logits[:, i]`` is computed from the hidden state at i (unshifted); the T new keys/values
    are written into the cache at ``segments.position`` (design.md, "Model and KV cache").
    """

    def __call__(self, params: Any, tokens: jax.Array, segments: Segments, cache: Any) -> tuple[jax.Array, Any]: ...


class CacheFn(Protocol):
    """``(batch, length) -> cache``: an empty position-addressed KV cache (traced inside the decoder)."""

    def __call__(self, batch: int, length: int) -> Any: ...


class Forward(NamedTuple):
    """What the decoder needs from a model: the pure forward, its parameters, and a cache factory."""

    apply: LogitsFn
    params: Any
    make_cache: CacheFn


def model_forward(model: Any) -> Forward:
    """A `Forward` for an NNX `DreamModel`: `nnx.split` once, `nnx.merge` inside the pure function."""
    from flax import nnx

    from pdjax.model import init_cache

    graphdef, params = nnx.split(model)
    config = model.config

    def apply(params: Any, tokens: jax.Array, segments: Segments, cache: Any) -> tuple[jax.Array, Any]:
        return nnx.merge(graphdef, params)(tokens, segments, cache=cache)

    def make_cache(batch: int, length: int) -> Any:
        return init_cache(config, batch, length)

    return Forward(apply, params, make_cache)
