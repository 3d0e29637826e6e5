"""The memory helper against hand arithmetic and a PyTorch parameter count."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pdjax.memory import GiB, serving_memory, training_memory
from pdjax.model import DreamConfig


def small() -> DreamConfig:
    return DreamConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def torch_param_count(c: DreamConfig) -> int:
    cfg = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())


def test_parameter_terms_match_pytorch_count():
    c = small()
    n = torch_param_count(c)
    est = dict(training_memory(c, batch_per_device=1, seq_len=8, fsdp=2, tensor=2).terms)
    assert est["parameters"] == n * 4 / 4
    assert est["gradients"] == n * 4 / 4
    assert est["AdamW moments"] == 2 * n * 4 / 4


def test_activation_and_logit_terms_by_hand():
    c = small()
    est = dict(training_memory(c, batch_per_device=2, seq_len=16, fsdp=1, tensor=1, remat="full").terms)
    tokens = 32
    none_per_layer = (5 * 64 + 3 * 64 + 2 * 32 + 3 * 256) * 2 + 4 * 8  # bytes per token, remat none
    assert est["activations (remat=full)"] == tokens * (2 * 64 * 2 + none_per_layer)
    assert est["logits + their gradient (f32)"] == tokens * 1000 * 4 * 2
    lora = dict(training_memory(c, batch_per_device=1, seq_len=8, fsdp=1, lora_rank=4).terms)
    per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 256) * 2 + (256 + 64))
    assert lora["LoRA params + grads + AdamW"] == 2 * per_layer * (4 + 4 + 8)
    merged = 64 * 64 + 64 * 32 * 2 + 64 * 64 + 64 * 256 * 3  # q, k, v, o, gate, up, down weights of one layer
    assert lora["LoRA-merged weights + their gradient (f32)"] == 2 * 2 * merged * 4
    assert "gradients" not in lora


def test_serving_by_hand():
    c = small()
    est = dict(serving_memory(c, batch=3, max_length=100, tensor=2, widest_call=10).terms)
    assert est["KV cache"] == 2 * 2 * 3 * 101 * 2 * 16 * 2 / 2  # max_length + 1 slots (one is scratch)
    assert est["weights"] == c.num_params * 2 / 2
    # the widest call: 30 tokens x (two MLP products + six hidden buffers) in bf16, two blocks of scores (all
    # 10 queries fit 256 MiB); one sampling chunk: four f32 [512, 1000] arrays (the decoder's chunk: a power of
    # two no larger than what batch x max_length needs) -- the larger of the two
    forward = 30 * (2 * 256 / 2 + 6 * 64) * 2 + 2 * (3 * 2 * 10 * 101 * 4)
    sampling = 4 * 512 * 1000 * 4
    assert est["widest call (or sampling chunk)"] == max(forward, sampling) == sampling
    wide = dict(serving_memory(DreamConfig.dream_7b(), batch=8, max_length=2048).terms)
    # Dream-7B: the call wins; its scores come in blocks of 128 queries (the power of two under 256 MiB)
    tokens = 8 * 2048
    assert wide["widest call (or sampling chunk)"] == tokens * (2 * 18944 + 6 * 3584) * 2 + 2 * 8 * 28 * 128 * 2049 * 4


def test_dream_7b_numbers():
    c = DreamConfig.dream_7b()
    assert c.num_params == pytest.approx(7.6e9, rel=0.02)
    serve = serving_memory(c, batch=1, max_length=2048)
    assert dict(serve.terms)["weights"] / GiB == pytest.approx(c.num_params * 2 / GiB)
    train = training_memory(c, batch_per_device=1, seq_len=4096, fsdp=16)
    # 16 bytes/parameter of states over 16 chips: about 7.1 GiB each
    states = sum(b for name, b in train.terms if name in ("parameters", "gradients", "AdamW moments"))
    assert states / GiB == pytest.approx(c.num_params * 16 / 16 / GiB)
    assert "total" in train.table() and "GiB" in train.table()
