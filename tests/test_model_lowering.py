"""The model's TPU programs lower (xla reference and the Pallas kernel), and remat leaves the numbers alone."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pdjax.model import DreamConfig, abstract_model, init_cache
from pdjax.structure import Segments

B, T, S = 2, 128, 256


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_forward_cached_forward_and_gradient_lower_for_tpu(impl):
    """TPU-shaped tiles (head_dim 128, 128-token blocks), bf16 compute, remat on: export for TPU from CPU."""
    config = DreamConfig.tiny(
        attention_impl=impl, hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=128, dtype=jnp.bfloat16, remat="dots"
    )
    graphdef, state = nnx.split(abstract_model(config))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    seg = Segments(*[jax.ShapeDtypeStruct((B, T), jnp.int32)] * 5)
    cache = jax.eval_shape(lambda: init_cache(config, B, S))

    def cached(state, tokens, seg, cache):
        return nnx.merge(graphdef, state)(tokens, seg, cache)

    def loss(state, tokens, seg):
        return jnp.mean(nnx.merge(graphdef, state)(tokens, seg)[0])

    for fn, args in [(cached, (state, tokens, seg, cache)), (jax.grad(loss), (state, tokens, seg))]:
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
        assert exported.platforms == ("tpu",)


def test_remat_policy_wraps_each_layer():
    """The knob reaches jax.checkpoint (numerics are jax's; compiling two CPU gradients would cost ~15 s)."""
    tokens = jax.ShapeDtypeStruct((2, 12), jnp.int32)
    seg = Segments(*[jax.ShapeDtypeStruct((2, 12), jnp.int32)] * 5)
    found = {}
    for remat in ("none", "full", "dots", "dots_no_batch"):
        graphdef, state = nnx.split(abstract_model(DreamConfig.tiny(remat=remat)))
        jaxpr = str(jax.make_jaxpr(lambda s, t, g: nnx.merge(graphdef, s)(t, g)[0])(state, tokens, seg))
        found[remat] = (jaxpr.count("remat2["), "DotsSaveable(only_if_no_batch_dims=True)" in jaxpr)
    # one checkpointed layer body inside the layer scan
    assert found == {"none": (0, False), "full": (1, False), "dots": (1, False), "dots_no_batch": (1, True)}
