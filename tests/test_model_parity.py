"""pdjax's Dream forward against transformers' Qwen2 (PyTorch, float32) on a random tiny checkpoint.

The checkpoint is built and saved by transformers itself; pdjax loads it with
`load_pretrained`. HF gets the attention pattern as an explicit 4-D additive
mask built from the dense rule `pdjax.structure.attention_mask`, and the same
position ids.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2Config, Qwen2ForCausalLM

from pdjax.model import DreamConfig, load_pretrained, shift_logits
from pdjax.structure import NEVER, Segments, attention_mask, pack_documents, segments_from_tokens
from structures import IDS, enc

TOL = 1e-4


def random_qwen2(config: DreamConfig, seed: int = 0, proj_std: float = 0.2, head_from_embed: bool = False) -> Qwen2ForCausalLM:
    """A transformers Qwen2 of this shape with every weight random (biases and norms too, so they matter)."""
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM._from_config(Qwen2Config(**config.to_hf_dict()), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            std = proj_std if "proj.weight" in name else 0.2 if ("embed" in name or "lm_head" in name) else 0.1
            p.copy_(torch.randn_like(p) * std)
            if "norm" in name:
                p.add_(1.0)
        if head_from_embed:
            hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)
    return hf


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_tiny")
    hf = random_qwen2(DreamConfig.tiny())
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def forward(checkpoint):
    path, _ = checkpoint
    model = load_pretrained(path)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, seg):
        return nnx.merge(graphdef, state)(tokens, seg)[0]

    return lambda tokens, seg: np.asarray(run(state, tokens, seg))


def hf_logits(hf, tokens: np.ndarray, allowed: np.ndarray | None, position: np.ndarray) -> np.ndarray:
    """transformers' logits with the given [B, T, T] boolean mask (None: its own causal mask)."""
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    pos = torch.tensor(np.asarray(position), dtype=torch.long)
    if allowed is None:
        mask = None
    else:
        additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
        mask = {"full_attention": torch.tensor(additive)}
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()


def batch(*segs: Segments) -> Segments:
    return Segments(*(np.stack([np.asarray(getattr(s, f), np.int32) for s in segs]) for f in Segments._fields))


def causal_segments(b: int, t: int) -> Segments:
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    zeros = np.zeros((b, t), np.int32)
    return Segments(zeros, pos.copy(), pos.copy(), zeros + 1, zeros + 1)


def bidirectional_segments(b: int, t: int) -> Segments:
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    ones = np.ones((b, t), np.int32)
    return Segments(ones, np.full((b, t), NEVER, np.int32), pos.copy(), ones, ones)


AURORA = np.array(
    enc(
        "Aurora ? <promise>-<topic> what 1 </topic> <promise>-<topic> why 1 </topic> "
        "<async> lights [PAD] </async> <async> sun </async> <sync/> "
        "<promise>-<topic> so 1 </topic> <async> pretty </async> <|im_end|>"
    ),
    np.int32,
)


def test_causal_matches_transformers(checkpoint, forward):
    _, hf = checkpoint
    tokens = np.random.default_rng(0).integers(0, 1024, (2, 24)).astype(np.int32)
    seg = causal_segments(2, 24)
    ours = forward(tokens, seg)
    ref = hf_logits(hf, tokens, None, seg.position)
    assert ours.dtype == np.float32 and ours.shape == (2, 24, 1024)
    assert np.abs(ours - ref).max() <= TOL


def test_bidirectional_matches_transformers(checkpoint, forward):
    _, hf = checkpoint
    tokens = np.random.default_rng(1).integers(0, 1024, (2, 24)).astype(np.int32)
    seg = bidirectional_segments(2, 24)
    ours = forward(tokens, seg)
    ref = hf_logits(hf, tokens, np.ones((2, 24, 24), bool), seg.position)
    assert np.abs(ours - ref).max() <= TOL
    # and it really is not the causal model
    assert np.abs(ours - hf_logits(hf, tokens, None, seg.position)).max() > 1e-2


def test_planned_masks_match_transformers(checkpoint, forward):
    """Sparse groups, dense groups, and two packed documents whose positions restart."""
    _, hf = checkpoint
    n = len(AURORA)
    sparse = segments_from_tokens(AURORA, 2, IDS)
    dense = segments_from_tokens(AURORA, 2, IDS, dense_groups=True)
    doc1 = np.array(enc("Hi <promise>-<topic> a 1 </topic> <async> x y </async> <|im_end|>"), np.int32)
    doc2 = np.array(enc("Yo <promise>-<topic> b 2 </topic> <async> p q r </async> <sync/> done <|im_end|>"), np.int32)
    packed_tokens, packed = pack_documents(
        [(doc1, segments_from_tokens(doc1, 1, IDS)), (doc2, segments_from_tokens(doc2, 1, IDS))], n, pad_id=0
    )
    tokens = np.stack([AURORA, AURORA, packed_tokens])
    seg = batch(sparse, dense, packed)
    ours = forward(tokens, seg)
    allowed = attention_mask(seg)
    assert not allowed[0, 14, 11] and allowed[1, 14, 11]  # sparse vs dense: spans of one group
    ref = hf_logits(hf, tokens, allowed, seg.position)
    assert np.abs(ours - ref).max() <= TOL


def test_bf16_top1_agrees_with_f32(tmp_path):
    """bf16 params and compute keep >= 99% of the float32 top-1 predictions.

    The model has decisive predictions, as trained models do: the head holds the
    embedding values and projections are N(0, 0.08), so ~70% of argmaxes copy the
    input and the rest depend on the context. (On a chaotic random net the top
    two logits are near ties and even transformers' own bf16 keeps only ~96%.)
    """
    random_qwen2(DreamConfig.tiny(), seed=1, proj_std=0.08, head_from_embed=True).save_pretrained(tmp_path)
    f32 = load_pretrained(tmp_path)
    bf16 = load_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert bf16.layers.q_proj[...].dtype == jnp.bfloat16 and bf16.config.dtype == jnp.bfloat16
    tokens = np.random.default_rng(2).integers(0, 1024, (8, 64)).astype(np.int32)
    seg = causal_segments(8, 64)
    ref = np.asarray(nnx.jit(lambda m, t, s: m(t, s)[0])(f32, tokens, seg))
    ours = np.asarray(nnx.jit(lambda m, t, s: m(t, s)[0])(bf16, tokens, seg))
    assert ours.dtype == np.float32
    assert 0.2 < np.mean(ref.argmax(-1) == tokens) < 0.95  # predictions are not a pure copy of the input
    agree = np.mean(ours.argmax(-1) == ref.argmax(-1))
    assert agree >= 0.99, agree


def test_shift_logits_reads_prediction_at_previous_position():
    logits = np.random.default_rng(3).normal(size=(2, 5, 7)).astype(np.float32)
    expected = logits.copy()
    expected[:, 1:] = logits[:, :-1]
    np.testing.assert_array_equal(np.asarray(shift_logits(jnp.asarray(logits))), expected)
