"""A newcomer's first commands on a fresh clone: the tiny CPU config trains from nothing, and the exported
folder says how to decode it (generation_config.json, read by `pdjax.decode`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_cpu_config_generates_its_data_and_tokenizer_on_first_use(tmp_path):
    """`python -m pdjax.train --config configs/tiny_cpu.yaml` in a folder with no data: the config's own source
    writes data and tokenizer (a smaller data set and 2 steps here, same paths), trains and exports."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    source = cfg["data"]["source"]
    assert source.startswith("synthetic:")
    folder = source.removeprefix("synthetic:").split("?")[0]
    assert cfg["model"]["tokenizer"] == f"{folder}/tokenizer"  # the tokenizer the source writes
    small = f"synthetic:{folder}?seed=0&num_train=200&num_heldout=10"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pdjax.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "steps=2",
           f"data.source={small}", "log.every_steps=1", "checkpoint.every_steps=2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / folder / "tokenizer" / "tokenizer.json").is_file()
    export = tmp_path / cfg["checkpoint"]["export_dir"]
    assert (export / "model.safetensors").is_file()
    assert json.loads((export / "generation_config.json").read_text())["pdjax_mode"] == "pd"


@pytest.mark.parametrize(("mode", "masks", "want"), [
    ("planned", None, {"pdjax_mode": "pd"}),
    ("dense", None, {"pdjax_mode": "pd"}),
    ("ar_only", None, {"pdjax_mode": "ar"}),
    ("diffusion_only", 64, {"pdjax_mode": "diffusion", "max_new_tokens": 64}),
    ("diffusion", None, {"pdjax_mode": "diffusion"}),
])
def test_generation_config_round_trip(tmp_path, mode, masks, want):
    from pdjax.decode.model_info import ModelInfo, read_model_info, write_generation_config

    assert read_model_info(tmp_path) == ModelInfo()
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.2}')  # keys already there are kept
    write_generation_config(tmp_path, mode, masks)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"temperature": 0.2, **want}
    assert read_model_info(tmp_path) == ModelInfo(want["pdjax_mode"], want.get("max_new_tokens"))


def test_unknown_or_broken_generation_configs_read_as_unknown(tmp_path):
    from pdjax.decode.model_info import ModelInfo, read_model_info, write_generation_config

    (tmp_path / "generation_config.json").write_text('{"pdjax_mode": "dream", "max_new_tokens": -3}')
    assert read_model_info(tmp_path) == ModelInfo()
    (tmp_path / "generation_config.json").write_text("{not json")
    assert read_model_info(tmp_path) == ModelInfo()
    with pytest.raises(ValueError, match="unknown mode 'dream'"):
        write_generation_config(tmp_path, "dream")


def test_shipped_models_record_their_mode():
    from pdjax.decode.model_info import ModelInfo, default_model_path, read_model_info

    assert read_model_info(default_model_path("pd")) == ModelInfo("pd")
    assert read_model_info(default_model_path("ar")) == ModelInfo("ar")
    # configs/default_model_diffusion.yaml fills answers to eos_fill_length tokens: the masks it decodes
    fill = yaml.safe_load((REPO / "configs" / "default_model_diffusion.yaml").read_text())["data"]["eos_fill_length"]
    assert read_model_info(default_model_path("diffusion")) == ModelInfo("diffusion", fill)
