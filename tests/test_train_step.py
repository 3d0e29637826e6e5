"""The pure train step: gradient accumulation is exact; bfloat16 compute is a knob, not new math; TPU lowering.

(The remat knob's numerics are the model's, tested in test_model_lowering.py; here it only has to lower.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pdjax.model import DreamConfig, abstract_model
from pdjax.structure import Segments, pack_documents, segments_from_tokens
from pdjax.train.loss import LossConfig
from pdjax.train.step import StepOptions, TrainState, make_train_step
from structures import IDS, enc

L = 40
DOCS = [
    ("p1 p2", "<promise>-<topic> a 1 </topic> <promise>-<topic> b 2 </topic> <async> x y [PAD] </async> <async> z </async> <|im_end|>"),
    ("p3", "plain words here <|im_end|>"),
    ("p4 p5 p6", "<promise>-<topic> c 1 </topic> <async> u v </async> <sync/> w <|im_end|>"),
    ("p7", "<promise>-<topic> d 1 </topic> <async> s [PAD] [PAD] </async> <|im_end|>"),
]


def batch() -> dict[str, np.ndarray]:
    """Four packed rows; word ids come from tests/structures.enc (shared, < 256 in any test order)."""
    rows = [[0, 1], [2], [3, 1], [2, 3]]
    toks, segs = [], []
    for row in rows:
        docs = []
        for i in row:
            p, r = enc(DOCS[i][0]), enc(DOCS[i][1])
            docs.append((np.asarray(p + r), segments_from_tokens(p + r, len(p), IDS)))
        t, s = pack_documents(docs, L, 0)
        toks.append(t)
        segs.append(s)
    return {"tokens": np.stack(toks), **{f: np.stack([getattr(s, f) for s in segs]) for f in Segments._fields}}


@functools.lru_cache(maxsize=None)
def weights() -> dict:
    """The tiny model's parameters drawn by NumPy (norms 1, the rest N(0, 0.02)): no eager model init."""
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(DreamConfig.tiny(vocab_size=256)), nnx.Param))
    rng = np.random.default_rng(0)

    def draw(path, s):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return np.ones(s.shape, np.float32) if "norm" in name else (0.02 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def run_step(config: DreamConfig, grad_accum: int):
    graphdef, _ = nnx.split(abstract_model(config), nnx.Param)
    params = jax.tree.map(jnp.asarray, weights())
    # plain SGD with lr 1: the parameter change is the gradient itself (Adam's first step would amplify
    # float noise in near-zero gradients to a full lr-sized step)
    tx = optax.sgd(1.0)
    options = StepOptions(LossConfig(), mask_id=IDS.mask, grad_accum=grad_accum)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(1.0), options))
    train_state = TrainState(jnp.int32(0), params, tx.init(params), jax.random.key_data(jax.random.key(7)))
    new_state, metrics = step(train_state, {}, {k: jnp.asarray(v) for k, v in batch().items()})
    return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference():
    return run_step(DreamConfig.tiny(vocab_size=256), grad_accum=1)


def test_gradient_accumulation_is_exact(reference):
    params1, m1 = reference
    params2, m2 = run_step(DreamConfig.tiny(vocab_size=256), grad_accum=2)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert m1["masked_tokens"] > 0 and m1["ar_targets"] > 0


def test_bfloat16_compute_keeps_float32_params_and_close_loss(reference):
    _, m1 = reference
    params_b, m_b = run_step(DreamConfig.tiny(vocab_size=256, dtype=jnp.bfloat16), grad_accum=1)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params_b))
    np.testing.assert_allclose(m_b["loss"], m1["loss"], rtol=2e-2)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu"])
def test_sharded_train_step_lowers_for_tpu(impl):
    """The whole step (LoRA and full), sharded on a 2x4 mesh, bf16 compute, remat: exported for TPU from CPU."""
    from pdjax.model import abstract_model, make_mesh, state_shardings
    from pdjax.train.lora import LoraConfig
    from pdjax.train.step import batch_sharding, jit_train_step, state_layout

    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    config = DreamConfig.tiny(
        vocab_size=256, hidden_size=128, num_heads=4, num_kv_heads=4, head_dim=128,
        dtype=jnp.bfloat16, remat="dots", attention_impl=impl,
    )
    graphdef, state = nnx.split(abstract_model(config, mesh), nnx.Param)
    base = nnx.to_pure_dict(state)
    base_shardings = nnx.to_pure_dict(state_shardings(state, mesh, config.axis_rules))
    tx = optax.adamw(1e-4)
    shape = (8, 256)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, config.axis_rules, shape))
             for k in ("tokens", *Segments._fields)}
    for lora in (None, LoraConfig(rank=8)):
        abstract, shardings, frozen_shardings = state_layout(base, base_shardings, tx, mesh, config.axis_rules, lora)
        options = StepOptions(LossConfig(), mask_id=3, grad_accum=2, lora=lora)
        step = jit_train_step(
            make_train_step(graphdef, tx, optax.constant_schedule(1e-4), options),
            shardings, frozen_shardings, {k: v.sharding for k, v in batch.items()}, mesh,
        )
        frozen = {"base": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base, base_shardings)} if lora else {}
        with jax.set_mesh(mesh):
            exported = jax.export.export(step.jitted, platforms=["tpu"])(abstract, frozen, batch)
        assert exported.platforms == ("tpu",)
        assert exported.nr_devices == 8
