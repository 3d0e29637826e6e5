"""LoRA: the reparametrisation against NumPy matrix products, frozen base weights, merged export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_loop import host_params, make_config, tokenizer

from pdjax.model import DreamConfig, abstract_model
from pdjax.train import lora as lora_lib
from pdjax.train.trainer import Trainer


@pytest.fixture(scope="module")
def base():
    """Random weights of the tiny model's shapes (drawn by NumPy: no model initialisation needed)."""
    config = DreamConfig.tiny(vocab_size=64, num_layers=2)
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    rng = np.random.default_rng(3)
    return config, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def test_lora_delta_is_b_times_a_in_hf_matrix_order(base):
    """Each projection is HF's [out, in] matrix; the update must be scale * B @ A on that matrix, per layer."""
    config, params = base
    cfg = lora_lib.LoraConfig(rank=3, alpha=6.0)
    pairs = lora_lib.init_lora(params, cfg, jax.random.key(1))
    rng = np.random.default_rng(0)
    pairs = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), pairs)  # b = 0 at init
    merged = lora_lib.apply_lora(params, pairs, cfg)
    for name, n_out in lora_lib.OUTPUT_AXES.items():
        w = np.asarray(params["layers"][name])
        a = np.asarray(pairs["layers"][name]["a"])
        b = np.asarray(pairs["layers"][name]["b"])
        out_features = int(np.prod(w.shape[1 : 1 + n_out]))
        in_features = int(np.prod(w.shape[1 + n_out :]))
        for layer in range(config.num_layers):
            want = w[layer].reshape(out_features, in_features) + 2.0 * (
                b[layer].reshape(out_features, 3) @ a[layer].reshape(3, in_features)
            )
            got = np.asarray(merged["layers"][name][layer]).reshape(out_features, in_features)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    untouched = jax.tree.leaves({k: v for k, v in merged.items() if k != "layers"})
    assert all(np.array_equal(x, y) for x, y in zip(untouched, jax.tree.leaves({k: v for k, v in params.items() if k != "layers"})))


def test_lora_starts_at_the_base_model(base):
    _, params = base
    cfg = lora_lib.LoraConfig(rank=4)
    merged = lora_lib.merge(params, lora_lib.init_lora(params, cfg, jax.random.key(0)), cfg)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype


def test_lora_training_keeps_base_frozen_and_exports_merged(tmp_path):
    from pdjax.model.checkpoint import load_pretrained

    cfg = make_config(tmp_path, "lora", "steps=12", "lora.rank=4", "lora.targets=[q_proj, v_proj, down_proj]",
                      "optimizer.learning_rate=1e-2", "grad_accum=2")
    trainer = Trainer.create(cfg, tokenizer=tokenizer(), devices=jax.devices()[:1], log=None)
    base_before = jax.tree.map(np.asarray, jax.device_get(trainer.frozen["base"]))
    assert set(trainer.state.params["layers"]) == {"q_proj", "v_proj", "down_proj"}
    history = trainer.train()
    first, last = (np.mean([h["loss"] for h in part]) for part in (history[:4], history[-4:]))
    assert last < first  # averaged over 4 steps: one step's batch can be much harder than another's
    for x, y in zip(jax.tree.leaves(jax.device_get(trainer.frozen["base"])), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(x, y)  # the base never moves
    assert all(np.abs(np.asarray(p["b"])).max() > 0 for p in trainer.state.params["layers"].values())
    merged = host_params(trainer)
    assert not np.array_equal(merged["layers"]["q_proj"], base_before["layers"]["q_proj"])
    np.testing.assert_array_equal(merged["layers"]["k_proj"], base_before["layers"]["k_proj"])  # not targeted
    trainer.export(str(tmp_path / "hf"))
    loaded = jax.tree.map(np.asarray, jax.device_get(nnx.to_pure_dict(nnx.state(load_pretrained(str(tmp_path / "hf"))))))
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(x, y)
    trainer.close()
