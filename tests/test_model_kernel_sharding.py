"""The Pallas kernel inside the sharded model: run per shard (shard_map) and equal to the xla path."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pdjax.model import DreamConfig, DreamModel, make_mesh
from pdjax.structure import segments_from_tokens
from structures import IDS, enc

KERNEL = (("block_q", 16), ("block_kv", 16), ("interpret", True))


def test_pallas_kernel_under_fsdp_and_tensor_mesh_matches_xla():
    text = (
        "q r <promise>-<topic> a 1 </topic> <promise>-<topic> b 1 </topic> "
        "<async> x y [PAD] </async> <async> z </async> <sync/> tail <|im_end|>"
    )
    toks = np.array(enc(text)) % 1000
    seg = segments_from_tokens(enc(text), 2, IDS)
    batch_tokens = jnp.asarray(np.stack([toks, toks[::-1]]))
    batch_seg = jax.tree.map(lambda a: jnp.asarray(np.stack([a, a])), seg)
    xla = DreamModel(DreamConfig.tiny(), rngs=nnx.Rngs(0))
    expected, _ = xla(batch_tokens, batch_seg)
    kernel_graph = nnx.graphdef(DreamModel(DreamConfig.tiny(attention_impl="pallas_tpu", attention_options=KERNEL), rngs=nnx.Rngs(1)))
    kernel = nnx.merge(kernel_graph, nnx.state(xla))
    with jax.set_mesh(make_mesh({"fsdp": 2, "tensor": 4})):  # 4 kv heads: one per tensor shard
        got, _ = jax.jit(lambda t, s: kernel(t, s))(batch_tokens, batch_seg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
