"""Dream (Qwen2-shaped) decoder in Flax NNX with segment-id attention and a position-addressed KV cache.

Layers are stacked along a leading ``layers`` axis and run with `jax.lax.scan`
(compile time independent of depth; the per-layer KV cache is scanned with them).
Parameters keep Hugging Face's memory order, reshaped to name the head axis:
``q_proj`` [L, Nq, H, D] is HF's [Nq*H, D] weight of each layer, so checkpoint
I/O is a reshape, never a transpose.

Attention always goes through `pdjax.attention.attention` with the segment ids
of queries and keys, so the mask is the METHOD §2 rule (causal, bidirectional,
planned or dense groups alike) and the XLA reference and TPU kernels are
interchangeable.

Projections, the embedding and the head may hold `qwix.QArray` weights (`pdjax.model.quantize`): the
matmuls and the embedding lookup go through that module's `einsum` and `take_rows`, which read them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pdjax.attention import attention
from pdjax.attention.reference import SCORE_BYTES
from pdjax.model.cache import KVCache, read_kv, write_kv, write_segments
from pdjax.model.config import DreamConfig
from pdjax.model.layers import apply_rope, normal, ones, param, rms_norm, rope_tables, zeros
from pdjax.model.quantize import einsum, take_rows
from pdjax.model.sharding import constrain, logical_to_spec
from pdjax.structure import Segments

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axis names of each stacked layer parameter (also the layout contract of checkpoint I/O).
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "input_norm": ("layers", "norm"),
    "q_proj": ("layers", "heads", "head_dim", "embed"),
    "q_bias": ("layers", "heads", "head_dim"),
    "k_proj": ("layers", "kv_heads", "head_dim", "embed"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_proj": ("layers", "kv_heads", "head_dim", "embed"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o_proj": ("layers", "embed", "heads", "head_dim"),
    "post_norm": ("layers", "norm"),
    "gate_proj": ("layers", "mlp", "embed"),
    "up_proj": ("layers", "mlp", "embed"),
    "down_proj": ("layers", "embed", "mlp"),
}


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: Segments, kv_seg: Segments, c: DreamConfig,
           cached: bool = False) -> jax.Array:
    """`pdjax.attention.attention` with the config's implementation and options.

    A ``cached`` call (decoding over a KV cache) of the `xla` reference bounds its float32 scores to
    `SCORE_BYTES` by taking its queries a block at a time.

    XLA partitions the `xla` reference like any jnp code, but not a Pallas call:
    under a mesh, kernels run per shard in `shard_map`, batch split like the
    activations and heads split over the kv-head axis (query heads follow their
    kv group, so each shard holds whole GQA groups).
    """
    options = dict(c.attention_options)
    if cached and c.attention_impl == "xla":
        options.setdefault("score_bytes", SCORE_BYTES)
    mesh = jax.sharding.get_abstract_mesh()
    if c.attention_impl == "xla" or mesh.empty:
        return attention(q, k, v, q_seg, kv_seg, impl=c.attention_impl, **options)
    batch = logical_to_spec(("act_batch",), (q.shape[0],), mesh, c.axis_rules)[0]
    heads = logical_to_spec(("act_kv_heads",), (k.shape[2],), mesh, c.axis_rules)[0]
    act, seg = P(batch, None, heads, None), P(batch, None)
    seg_specs = Segments(*(seg,) * len(Segments._fields))

    def per_shard(q, k, v, q_seg, kv_seg):
        return attention(q, k, v, q_seg, kv_seg, impl=c.attention_impl, **options)

    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(act, act, act, seg_specs, seg_specs), out_specs=act, check_vma=False
    )(q, k, v, q_seg, kv_seg)


def layer_shapes(config: DreamConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each stacked layer parameter."""
    c = config
    n, k, h, d, f = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
    per_layer = {
        "input_norm": (d,),
        "q_proj": (n, h, d),
        "q_bias": (n, h),
        "k_proj": (k, h, d),
        "k_bias": (k, h),
        "v_proj": (k, h, d),
        "v_bias": (k, h),
        "o_proj": (d, n, h),
        "post_norm": (d,),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }
    return {name: (c.num_layers, *shape) for name, shape in per_layer.items()}


class DecoderLayers(nnx.Module):
    """All decoder layers, parameters stacked on a leading ``layers`` axis, run by `lax.scan`."""

    def __init__(self, config: DreamConfig, *, rngs: nnx.Rngs):
        self.config = config
        shapes = layer_shapes(config)
        for name, shape in shapes.items():
            if name.endswith("norm"):
                init = ones
            elif name.endswith("bias"):
                init = zeros
            else:
                init = normal(0.02)
            setattr(self, name, param(init, rngs, shape, config.param_dtype, LAYER_AXES[name]))

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        q_seg: Segments,
        kv_seg: Segments,
        cache: KVCache | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D] through every layer; returns x and, with a cache, the updated k, v stacks."""
        c = self.config
        weights = {name: getattr(self, name)[...] for name in LAYER_AXES}

        def layer(x: jax.Array, w: dict[str, jax.Array], stack_k: jax.Array | None, stack_v: jax.Array | None,
                  index: jax.Array | None = None):
            w = {name: value.astype(c.dtype) for name, value in w.items()}
            h = rms_norm(x, w["input_norm"], c.rms_norm_eps)
            q = einsum("btd,nhd->btnh", h, w["q_proj"]) + w["q_bias"]
            k = einsum("btd,khd->btkh", h, w["k_proj"]) + w["k_bias"]
            v = einsum("btd,khd->btkh", h, w["v_proj"]) + w["v_bias"]
            q = constrain(apply_rope(q, *rope), ("act_batch", "act_length", "act_heads", None), c.axis_rules)
            k = constrain(apply_rope(k, *rope), ("act_batch", "act_length", "act_kv_heads", None), c.axis_rules)
            v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None), c.axis_rules)
            if stack_k is not None:
                stack_k = write_kv(stack_k, index, q_seg.position, k)
                stack_v = write_kv(stack_v, index, q_seg.position, v)
                k = read_kv(stack_k, index, c.num_kv_heads).astype(c.dtype)
                v = read_kv(stack_v, index, c.num_kv_heads).astype(c.dtype)
            out = attend(q, k, v, q_seg, kv_seg, c, cached=stack_k is not None)
            x = x + einsum("btnh,dnh->btd", out, w["o_proj"])
            x = constrain(x, ("act_batch", "act_length", "act_embed"), c.axis_rules)
            h = rms_norm(x, w["post_norm"], c.rms_norm_eps)
            gate = einsum("btd,fd->btf", h, w["gate_proj"])
            up = einsum("btd,fd->btf", h, w["up_proj"])
            hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"), c.axis_rules)
            x = x + einsum("btf,df->btd", hidden, w["down_proj"])
            x = constrain(x, ("act_batch", "act_length", "act_embed"), c.axis_rules)
            return x, stack_k, stack_v

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[c.remat], prevent_cse=False)

        if cache is None:

            def body(x, w):
                x, _, _ = layer(x, w, None, None)
                return x, None

            x, _ = jax.lax.scan(body, x, weights)
            return x, None

        # the whole cache is carried and each layer writes its slice in place: as scanned inputs and
        # outputs it would be two more copies of the cache (one read, one written), per compiled call
        def cached_body(carry, w):
            x, stack_k, stack_v, index = carry
            x, stack_k, stack_v = layer(x, w, stack_k, stack_v, index)
            return (x, stack_k, stack_v, index + 1), None

        (x, new_k, new_v, _), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v, jnp.int32(0)), weights)
        return x, (new_k, new_v)


class DreamModel(nnx.Module):
    """The Dream decoder: ``logits, cache = model(tokens, segments, cache=None)``.

    tokens int32 [B, T]; segments a `Segments` of [B, T] arrays (RoPE uses
    ``segments.position``). logits float32 [B, T, V], ``logits[:, i]`` computed
    from the hidden state at i (apply `shift_logits` for Dream's j-1 reading).
    With a `KVCache`, the T new keys/values and segment ids are written at
    ``segments.position`` and the queries attend over the whole cache; the
    updated cache is returned (None without a cache). Tokens at positions
    >= the cache length are not written (fixed-shape calls can pad with them).
    """

    def __init__(self, config: DreamConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed_tokens = param(normal(0.02), rngs, (c.vocab_size, c.hidden_size), c.param_dtype, ("vocab", "embed"))
        self.layers = DecoderLayers(c, rngs=rngs)
        self.norm = param(ones, rngs, (c.hidden_size,), c.param_dtype, ("norm",))
        if not c.tie_word_embeddings:
            self.lm_head = param(normal(0.02), rngs, (c.vocab_size, c.hidden_size), c.param_dtype, ("vocab", "embed"))

    def __call__(
        self, tokens: jax.Array, segments: Segments, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        hidden, new_cache = self.hidden(tokens, segments, cache)
        return self.head(hidden), new_cache

    def hidden(
        self, tokens: jax.Array, segments: Segments, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-norm hidden states [B, T, D] (compute dtype) and the updated cache: `__call__` without the head.

        A decoder applies `head` only where it samples, so no [T, V] logits exist for positions it never reads.
        """
        c = self.config
        tokens = jnp.asarray(tokens, jnp.int32)
        segments = Segments(*(jnp.asarray(a, jnp.int32) for a in segments))
        x = take_rows(self.embed_tokens[...], tokens).astype(c.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"), c.axis_rules)
        rope = rope_tables(segments.position, c.head_dim, c.rope_theta)
        if cache is None:
            x, _ = self.layers(x, rope, segments, segments, None)
            new_cache = None
        else:
            kv_seg = write_segments(cache.segments, segments)
            x, (new_k, new_v) = self.layers(x, rope, segments, kv_seg, cache)
            new_cache = KVCache(new_k, new_v, kv_seg)
        return rms_norm(x, self.norm[...], c.rms_norm_eps), new_cache

    def head(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., V] of hidden states [..., D] (the LM head, or the tied embedding)."""
        c = self.config
        head = self.embed_tokens[...] if c.tie_word_embeddings else self.lm_head[...]
        logits = einsum("...d,vd->...v", hidden, head.astype(c.dtype), preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"), c.axis_rules)
        return logits


def shift_logits(logits: jax.Array) -> jax.Array:
    """Dream's reading: the prediction for token j comes from position j-1 (the one place this lives).

    ``out[:, j] = logits[:, j-1]`` for j >= 1 and ``out[:, 0] = logits[:, 0]``
    (position 0 has no predecessor; it is never a diffusion target). Works on
    any [B, T, ...] array.
    """
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def count_params(model_or_state: Any) -> int:
    """Number of parameters of a model or state (abstract ones included)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
