"""KV cache: prefill + extensions give the logits of one full forward over the same tokens.

The full forward (no cache) is the reference; it matches transformers in
test_model_parity. Covered: AR one token at a time inside `lax.fori_loop` with
rows at different offsets (and filler slots overwritten later), block extension
for sparse and dense groups, a denoising round rewritten by the commit pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pdjax.model import DreamConfig, KVCache, abstract_model, init_cache
from pdjax.structure import NEVER, Segments, segments_from_tokens
from structures import IDS, enc

TOL = 1e-4
CONFIG = DreamConfig.tiny()


@pytest.fixture(scope="module")
def model():
    """The tiny model with N(0, 0.2) weights (from NumPy: no init compile), large enough that attention patterns show."""
    graphdef, state = nnx.split(abstract_model(CONFIG))
    rng = np.random.default_rng(0)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        value = var.get_value()
        var.set_value(jnp.asarray(rng.normal(0, 0.2, value.shape) + ("norm" in path[-1]), value.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def full(model):
    return jax.jit(lambda t, s: model(t, s)[0])


@pytest.fixture(scope="module")
def cached(model):
    return jax.jit(lambda t, s, c: model(t, s, c))


def rows(*segs: Segments) -> Segments:
    return Segments(*(np.stack([np.asarray(getattr(s, f), np.int32) for s in segs]) for f in Segments._fields))


def take(seg: Segments, start: int, stop: int) -> Segments:
    return Segments(*(a[:, start:stop] for a in seg))


def causal(length: int) -> Segments:
    pos = np.arange(length, dtype=np.int32)
    return Segments(np.zeros(length, np.int32), pos, pos.copy(), np.ones(length, np.int32), np.ones(length, np.int32))


def test_empty_cache_layout():
    cache = init_cache(CONFIG, batch=3, max_length=16)
    assert cache.k.shape == cache.v.shape == (CONFIG.num_layers, 3, 16, CONFIG.num_kv_heads * CONFIG.head_dim)
    assert cache.k.dtype == CONFIG.dtype
    assert (np.asarray(cache.segments.visible_from) == NEVER).all() and (np.asarray(cache.segments.block_id) == 0).all()
    assert init_cache(CONFIG, 1, 4, dtype=jnp.bfloat16).v.dtype == jnp.bfloat16


def test_ar_decoding_in_a_loop_with_rows_at_different_offsets(model, full):
    """Row 0 has a 5-token prompt, row 1 a 3-token prompt padded with 2 filler slots that AR steps overwrite."""
    length, steps = 16, 11
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, length)).astype(np.int32)
    seg = rows(causal(length), causal(length))
    reference = np.asarray(full(tokens, seg))

    prefill_tokens = tokens[:, :5].copy()
    prefill = take(seg, 0, 5)
    filler = {"block_id": 0, "visible_from": NEVER, "doc_id": 0}
    prefill = Segments(*(a.copy() for a in prefill))
    for field, value in filler.items():
        getattr(prefill, field)[1, 3:] = value
    prefill_tokens[1, 3:] = 0
    logits, cache = model(prefill_tokens, prefill, init_cache(CONFIG, 2, length))
    np.testing.assert_allclose(logits[0], reference[0, :5], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits[1, :3], reference[1, :3], atol=TOL, rtol=0)

    start = jnp.array([5, 3])  # each row's next position

    @jax.jit
    def decode(cache: KVCache) -> jax.Array:
        def step(i, carry):
            cache, out = carry
            pos = (start + i)[:, None]
            tok = jnp.take_along_axis(jnp.asarray(tokens), pos, axis=1)
            one = Segments(jnp.zeros_like(pos), pos, pos, jnp.ones_like(pos), jnp.ones_like(pos))
            logits, cache = model(tok, one, cache)
            return cache, out.at[:, i].set(logits[:, 0])

        out = jnp.zeros((2, steps, CONFIG.vocab_size), jnp.float32)
        return jax.lax.fori_loop(0, steps, step, (cache, out))[1]

    out = np.asarray(decode(cache))
    np.testing.assert_allclose(out[0], reference[0, 5 : 5 + steps], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1], reference[1, 3 : 3 + steps], atol=TOL, rtol=0)


AURORA = np.array(
    enc(
        "Aurora ? <promise>-<topic> what 1 </topic> <promise>-<topic> why 1 </topic> "  # 0-9
        "<async> lights [PAD] </async> <async> sun </async> <sync/> "  # 10-17
        "<promise>-<topic> so 1 </topic> <async> pretty </async> <|im_end|>"  # 18-25
    ),
    np.int32,
)
GROUP = slice(10, 17)


def test_block_extension_sparse_and_dense_groups(cached, full):
    """Plan prefill, a masked denoising round, the commit pass (group + <sync/>), AR plan steps, a block, eos.

    Every call has the same shape (8 tokens): the unused tail sits at position
    `max_length`, which the cache drops, so one compiled function serves all.
    """
    max_length, width = 32, 8
    tokens = np.stack([AURORA, AURORA])
    seg = rows(segments_from_tokens(AURORA, 2, IDS), segments_from_tokens(AURORA, 2, IDS, dense_groups=True))
    reference = np.asarray(full(tokens, seg))
    content = seg.role[:, GROUP] == 3  # span content is masked; the tags stay
    masked = tokens.copy()
    masked[:, GROUP] = np.where(content, IDS.mask, tokens[:, GROUP])
    masked_reference = np.asarray(full(masked, seg))

    def extend(cache, toks, start, stop):
        pad = width - (stop - start)
        part = take(seg, start, stop)
        filler = np.full((2, pad), max_length, np.int32)
        seg_in = Segments(*(np.concatenate([a, filler], axis=1) for a in part))
        toks_in = np.concatenate([toks[:, start:stop], np.zeros((2, pad), np.int32)], axis=1)
        logits, cache = cached(toks_in, seg_in, cache)
        return np.asarray(logits[:, : stop - start]), cache

    cache = init_cache(CONFIG, 2, max_length)
    _, cache = extend(cache, tokens, 0, 8)
    _, cache = extend(cache, tokens, 8, 10)
    round_logits, cache = extend(cache, masked, 10, 17)
    np.testing.assert_allclose(round_logits, masked_reference[:, GROUP], atol=TOL, rtol=0)

    pieces = []
    for start, stop in [(10, 18), (18, 19), (19, 20), (20, 21), (21, 22), (22, 25), (25, 26)]:
        logits, cache = extend(cache, tokens, start, stop)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), reference[:, 10:], atol=TOL, rtol=0)
    # the cache kept the segment ids of every token it holds, and nothing at the filler's out-of-range position
    np.testing.assert_array_equal(np.asarray(cache.segments.visible_from)[:, :26], seg.visible_from)
    assert (np.asarray(cache.segments.visible_from)[:, 26:] == NEVER).all()
    # sparse and dense differ, so the comparison above distinguishes the two group layouts
    assert np.abs(reference[0, GROUP] - reference[1, GROUP]).max() > 1e-2
