"""Checkpoint I/O: transformers-written checkpoints in, transformers-loadable checkpoints out, sharded on a mesh."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_model_parity import TOL, causal_segments, hf_logits, random_qwen2
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2ForCausalLM

from pdjax.model import CheckpointError, DreamConfig, load_pretrained, make_mesh, save_pretrained

TOKENS = np.random.default_rng(5).integers(0, 1024, (2, 16)).astype(np.int32)
SEG = causal_segments(2, 16)


@pytest.fixture(scope="module")
def hf_model():
    return random_qwen2(DreamConfig.tiny(), seed=3)


@pytest.fixture(scope="module")
def reference(hf_model):
    return hf_logits(hf_model, TOKENS, None, SEG.position)


@pytest.fixture(scope="module")
def sharded_checkpoint(hf_model, tmp_path_factory):
    """transformers' own sharded layout: three safetensors files and an index."""
    path = tmp_path_factory.mktemp("sharded")
    hf_model.save_pretrained(path, max_shard_size="350KB")
    return path


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<|im_end|>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>")


def logits(model, mesh=None) -> np.ndarray:
    if mesh is None:
        return np.asarray(model(TOKENS, SEG)[0])
    with jax.set_mesh(mesh):
        return np.asarray(jax.jit(lambda t, s: model(t, s)[0])(TOKENS, SEG))


def test_three_shards_load_onto_a_2x4_mesh_with_fsdp_and_tensor_sharding(sharded_checkpoint, reference):
    files = sorted(f for f in os.listdir(sharded_checkpoint) if f.endswith(".safetensors"))
    assert len(files) == 3 and os.path.exists(sharded_checkpoint / "model.safetensors.index.json")
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    model = load_pretrained(sharded_checkpoint, mesh=mesh)
    expected = {
        "embed_tokens": P("tensor", "fsdp"),
        "lm_head": P("tensor", "fsdp"),
        "norm": P(None),
        "q_proj": P(None, "tensor", None, "fsdp"),
        "q_bias": P(None, "tensor", None),
        "k_proj": P(None, "tensor", None, "fsdp"),
        "o_proj": P(None, "fsdp", "tensor", None),
        "gate_proj": P(None, "tensor", "fsdp"),
        "down_proj": P(None, "fsdp", "tensor"),
        "input_norm": P(None, None),
    }
    for name, spec in expected.items():
        array = getattr(model.layers if hasattr(model.layers, name) else model, name)[...]
        assert array.sharding.mesh.shape == mesh.shape, name
        assert array.sharding.spec == spec, (name, array.sharding.spec)
    q = model.layers.q_proj[...]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 2, 8, 32)}  # [L, 8/4 heads, H, 64/2]
    np.testing.assert_allclose(logits(model, mesh), reference, atol=TOL, rtol=0)


def test_same_checkpoint_replicated_fsdp_or_tensor_parallel_by_mesh_alone(sharded_checkpoint, reference):
    for sizes in ({"data": 8}, {"fsdp": 8}, {"data": 2, "tensor": 4}):
        mesh = make_mesh(sizes)
        model = load_pretrained(sharded_checkpoint, mesh=mesh)
        sharded = model.layers.gate_proj[...].sharding
        assert sharded.is_fully_replicated == ("data" in sizes and "tensor" not in sizes), sizes
        np.testing.assert_allclose(logits(model, mesh), reference, atol=TOL, rtol=0)


def test_round_trip_through_transformers_with_tokenizer(sharded_checkpoint, reference, tmp_path):
    model = load_pretrained(sharded_checkpoint)
    tokenizer = tiny_tokenizer()
    written = save_pretrained(model, tmp_path, tokenizer=tokenizer, max_shard_size="300KB")
    assert len(written) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS, None, SEG.position), reference, atol=1e-6, rtol=0)
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path).encode("w3 w7", add_special_tokens=False) == [5, 9]
    # and back into pdjax, from pdjax's own layout
    np.testing.assert_allclose(logits(load_pretrained(tmp_path)), reference, atol=TOL, rtol=0)


def test_bf16_is_kept_on_save(sharded_checkpoint, tmp_path):
    model = load_pretrained(sharded_checkpoint, param_dtype=jnp.bfloat16)
    save_pretrained(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_pretrained(tmp_path).layers.q_proj[...].dtype == jnp.bfloat16


def dream_config_json(config: DreamConfig, eos: int = 151643, mask: int = 151666) -> dict:
    """A config.json with the keys of the released Dream checkpoints (transformers-4 style)."""
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "mask_token_id": mask,
        "max_position_embeddings": config.max_position_embeddings,
        "max_window_layers": config.num_layers,
        "model_type": "Dream",
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "pad_token_id": eos,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }


def test_dream_style_folder_round_trip(sharded_checkpoint, reference, tmp_path):
    """A Dream v4-style folder loads, saves back Dream-style (remote code copied) and still loads as Qwen2."""
    source, out = tmp_path / "dream", tmp_path / "out"
    source.mkdir()
    for f in os.listdir(sharded_checkpoint):
        if f.endswith((".safetensors", ".index.json")):
            shutil.copy(sharded_checkpoint / f, source / f)
    raw = dream_config_json(DreamConfig.tiny(), eos=1, mask=2)
    (source / "config.json").write_text(json.dumps(raw))
    for module in ("configuration_dream.py", "modeling_dream.py"):
        (source / module).write_text("# Dream remote code\n")
    model = load_pretrained(source)
    np.testing.assert_allclose(logits(model), reference, atol=TOL, rtol=0)
    save_pretrained(model, out)
    written = json.loads((out / "config.json").read_text())
    for key in ("model_type", "auto_map", "mask_token_id", "rope_theta", "architectures", "torch_dtype"):
        assert written[key] == raw[key], key
    assert "rope_parameters" not in written
    assert (out / "modeling_dream.py").exists() and (out / "configuration_dream.py").exists()
    reloaded = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS, None, SEG.position), reference, atol=1e-6, rtol=0)


def _rewrite(src, dst, edit):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(src / f))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_mismatched_tensors_are_named(sharded_checkpoint, tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    def extra(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]

    def reshape(t):
        t["model.layers.0.self_attn.k_proj.bias"] = np.zeros(7, np.float32)

    cases = {
        "missing": (drop, "model.layers.1.mlp.up_proj.weight"),
        "unexpected": (extra, "model.layers.2.mlp.up_proj.weight"),
        "mis-shaped": (reshape, "model.layers.0.self_attn.k_proj.bias: checkpoint [7], model [32]"),
    }
    for kind, (edit, name) in cases.items():
        _rewrite(sharded_checkpoint, tmp_path / kind, edit)
        with pytest.raises(CheckpointError, match=kind) as err:
            load_pretrained(tmp_path / kind)
        assert name in str(err.value)
    (tmp_path / "empty").mkdir()
    shutil.copy(sharded_checkpoint / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pretrained(tmp_path / "empty")


def test_tied_embeddings_checkpoint(tmp_path):
    """Qwen2 checkpoints with a tied head (no lm_head.weight) load, compute the same logits and save back tied."""
    hf = random_qwen2(DreamConfig.tiny(tie_word_embeddings=True), seed=4)
    hf.save_pretrained(tmp_path / "in")
    model = load_pretrained(tmp_path / "in")
    assert model.config.tie_word_embeddings and not hasattr(model, "lm_head")
    np.testing.assert_allclose(logits(model), hf_logits(hf, TOKENS, None, SEG.position), atol=TOL, rtol=0)
    save_pretrained(model, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as f:
        assert "lm_head.weight" not in f.keys()
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_allclose(
        hf_logits(reloaded, TOKENS, None, SEG.position), hf_logits(hf, TOKENS, None, SEG.position), atol=1e-6, rtol=0
    )
