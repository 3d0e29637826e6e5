"""Training config: YAML + dotted overrides, validation, unknown keys with close matches; the shipped configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdjax.train.config import TrainConfig, config_dict, load_config
from pdjax.train.optimizer import OptimizerConfig, decay_mask, learning_rate_schedule
from pdjax.train.overrides import ConfigError, from_dict, parse_overrides
from pdjax.train.trainer import is_multihost_launch

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
SOURCE = ["data.source=rows.jsonl"]


def test_overrides_reach_nested_sections_and_parse_values():
    cfg = load_config(
        None,
        SOURCE
        + [
            "optimizer.learning_rate=1e-4",  # YAML reads 1e-4 as a string; a float field takes it
            "lora.rank=8",
            "lora.targets=[q_proj, v_proj]",
            "data.mode=dense",
            "mesh.fsdp=-1",
            "mesh.data=1",
            "steps=7",
            "checkpoint.max_to_keep=null",
            "loss.recipe=reference",
        ],
    )
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.lora.rank == 8 and cfg.lora.targets == ("q_proj", "v_proj")
    assert cfg.loss_config.mode == "dense" and cfg.loss_config.recipe == "reference"
    assert cfg.mesh.sizes() == {"data": 1, "fsdp": -1, "tensor": 1}
    assert cfg.steps == 7 and cfg.checkpoint.max_to_keep is None


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\ndata:\n  source: a.jsonl\n  row_length: 64\noptimizer:\n  learning_rate: 0.01\n")
    cfg = load_config(str(path), ["data.row_length=128"])
    assert (cfg.steps, cfg.data.source, cfg.data.row_length, cfg.optimizer.learning_rate) == (3, "a.jsonl", 128, 0.01)
    again = from_dict(TrainConfig, config_dict(cfg))  # the saved form reads back
    assert again == cfg


@pytest.mark.parametrize(
    "item, expect",
    [
        ("optimizer.learning_rat=1", "optimizer.learning_rate"),
        ("optimiser.warmup_steps=1", "optimizer.warmup_steps"),
        ("data.row_lenght=4", "data.row_length"),
        ("grad_acum=2", "grad_accum"),
    ],
)
def test_unknown_key_lists_close_matches(item, expect):
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(None, SOURCE + [item])
    assert expect in str(err.value)


def test_unknown_key_in_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  source: a.jsonl\nmodel:\n  remat_policy: full\n")
    with pytest.raises(ConfigError, match="model.remat"):
        load_config(str(path))


@pytest.mark.parametrize(
    "item, message",
    [
        ("steps=abc", "steps"),
        ("data.mode=planed", "data.mode"),
        ("model.remat=everything", "remat"),
        ("model.dtype=float16", "dtype"),
        ("lora.targets=[qkv]", "lora.targets"),
        ("grad_accum=3", "divisible"),
        ("loss.normalize=rows", "loss.normalize"),
        ("log.tensorboard=maybe", "true/false"),
        ("bad-item", "key=value"),
    ],
)
def test_invalid_values_are_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, SOURCE + [item])


def test_missing_data_source_is_an_error():
    with pytest.raises(ConfigError, match="data"):
        load_config(None, ["steps=3"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.data.batch_size % cfg.grad_accum == 0
    if "lora" in path.name:
        assert cfg.lora.enabled
    if "ar_baseline" in path.name:
        assert cfg.data.mode == "ar_only"
    if "diffusion_baseline" in path.name:
        assert cfg.data.mode == "diffusion_only"


def test_shipped_config_set_is_complete():
    names = {p.name for p in CONFIGS}
    assert {
        "tiny_cpu.yaml",
        "dream7b_planned_v5p.yaml",
        "dream7b_planned_v6e_lora.yaml",
        "dream7b_ar_baseline.yaml",
        "dream7b_diffusion_baseline.yaml",
    } <= names


def test_warmup_cosine_schedule_and_decay_mask():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1)
    lr = learning_rate_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.55, rel=1e-4)  # half-way down the cosine: (1 + 0.1) / 2
    assert float(lr(110)) == pytest.approx(0.1)
    mask = decay_mask({"layers": {"q_proj": 0, "q_bias": 0, "input_norm": 0}, "norm": 0, "embed_tokens": 0})
    assert mask == {"layers": {"q_proj": True, "q_bias": False, "input_norm": False}, "norm": False, "embed_tokens": True}


def test_multihost_detection_from_the_environment():
    assert not is_multihost_launch({})
    assert not is_multihost_launch({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert is_multihost_launch({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert is_multihost_launch({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert is_multihost_launch({"SLURM_NTASKS": "4"})
    assert not is_multihost_launch({"SLURM_NTASKS": "1"})


def test_parse_overrides_values_are_yaml():
    assert parse_overrides(["a=1", "b=x", "c=[1, 2]", "d=null", "e=true"]) == {
        "a": 1,
        "b": "x",
        "c": [1, 2],
        "d": None,
        "e": True,
    }


def test_flops_per_token_counts_every_matmul_weight():
    """6 FLOPs per matmul weight (embedding lookup, biases and norms excluded) + the attention term."""
    from pdjax.model import DreamConfig
    from pdjax.train.metrics import flops_per_token, peak_flops

    c = DreamConfig.tiny()
    biases = c.num_layers * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    norms = c.num_layers * 2 * c.hidden_size + c.hidden_size
    matmul = c.num_params - c.vocab_size * c.hidden_size - biases - norms
    attention = 12 * c.num_layers * c.num_heads * c.head_dim * 256
    assert flops_per_token(c, 256) == 6 * matmul + attention
    assert flops_per_token(c, 256, frozen_weights=True) == 4 * matmul + attention

    class Device:
        device_kind = "TPU v5p"

    assert peak_flops(Device()) == 459e12
    assert peak_flops(Device(), override_tflops=100.0) == 100e12
    Device.device_kind = "cpu"
    assert peak_flops(Device()) is None


def test_yaml_on_off_reach_a_string_choice():
    """YAML 1.1 reads `on` as true: `distributed=on` must still mean "on"."""
    assert load_config(None, SOURCE + ["distributed=on"]).distributed == "on"
    assert load_config(None, SOURCE + ["distributed=off"]).distributed == "off"
