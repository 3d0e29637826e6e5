"""DreamConfig presets and HF config.json reading/writing; logical sharding rules; 7B abstract init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_model_checkpoint import dream_config_json
from transformers import Qwen2Config

from pdjax.model import (
    DEFAULT_RULES,
    DreamConfig,
    UnsupportedConfig,
    abstract_model,
    count_params,
    init_model,
    logical_to_spec,
    make_mesh,
)


def test_released_dream_config_json_parses_to_the_7b_preset(tmp_path):
    raw = dream_config_json(DreamConfig.dream_7b())
    raw["torch_dtype"] = "bfloat16"
    # the Planned Diffusion fine-tunes add these two attention knobs to Dream's config class
    raw.update(is_causal=False, disable_block_sparsity=False)
    (tmp_path / "config.json").write_text(__import__("json").dumps(raw))
    config = DreamConfig.from_hf(tmp_path)
    assert config == DreamConfig.dream_7b()
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (3584, 28, 28, 4)
    assert (config.intermediate_size, config.vocab_size, config.head_dim) == (18944, 152064, 128)
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-6 and not config.tie_word_embeddings
    assert config.param_dtype == jnp.bfloat16 and config.is_dream_style


def test_transformers5_qwen2_config_round_trips():
    tiny = DreamConfig.tiny(rope_theta=12345.0)
    hf = Qwen2Config(**tiny.to_hf_dict()).to_dict()
    assert hf["rope_parameters"]["rope_theta"] == 12345.0 and "rope_theta" not in hf
    parsed = DreamConfig.from_hf(hf)
    assert parsed == tiny
    assert not parsed.is_dream_style


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}, "rope_type='linear'"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
        ({"attention_bias": False}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"model_type": "llama"}, "llama"),
    ],
)
def test_unsupported_settings_are_errors(change, message):
    raw = {**dream_config_json(DreamConfig.tiny()), **change}
    with pytest.raises(UnsupportedConfig, match=message):
        DreamConfig.from_hf(raw)


def test_7b_abstract_init_is_sharded_and_has_7_6e9_parameters():
    config = DreamConfig.dream_7b()
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    model = abstract_model(config, mesh)
    total = count_params(model)
    assert abs(total - 7.6e9) <= 0.1e9, total
    assert total == config.num_params
    gate = model.layers.gate_proj.get_value()
    assert isinstance(gate, jax.ShapeDtypeStruct)  # nothing materialised
    assert gate.shape == (28, 18944, 3584) and gate.dtype == jnp.bfloat16
    assert gate.sharding.spec == P(None, "tensor", "fsdp")


def test_sharded_init_creates_each_parameter_on_its_shards():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    model = init_model(DreamConfig.tiny(), mesh, seed=0)
    embed = model.embed_tokens[...]
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in embed.addressable_shards} == {(256, 32)}
    np.testing.assert_allclose(float(jnp.std(embed)), 0.02, rtol=0.1)  # Qwen2's N(0, 0.02)
    assert (np.asarray(model.layers.input_norm[...]) == 1).all() and (np.asarray(model.layers.q_bias[...]) == 0).all()


def test_mesh_and_rules():
    mesh = make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((2, 2, 4))
    tp8 = make_mesh({"tensor": 8})
    # 28 heads and 4 kv heads do not split 8 ways: replicated on that axis instead of failing
    assert logical_to_spec(("layers", "heads", "head_dim", "embed"), (28, 28, 128, 3584), tp8, DEFAULT_RULES) == P(None, None, None, None)
    assert logical_to_spec(("vocab", "embed"), (152064, 3584), tp8, DEFAULT_RULES) == P("tensor", None)
    both = make_mesh({"data": 2, "fsdp": 4})
    assert logical_to_spec(("act_batch", "act_length"), (8, 16), both, DEFAULT_RULES) == P(("data", "fsdp"), None)
    assert logical_to_spec(("act_batch", "act_length"), (2, 16), both, DEFAULT_RULES) == P("data", None)
    assert logical_to_spec(("act_batch", "act_length"), (1, 16), both, DEFAULT_RULES) == P(None, None)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DreamConfig.tiny(num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        DreamConfig.tiny(remat="sometimes")
    assert hash(DreamConfig.tiny()) == hash(DreamConfig.tiny(hf_source={"x": 1}))
