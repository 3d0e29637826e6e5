"""The `pallas_tpu` kernel (interpret=True on CPU) and the `splash_dense` baseline against the
exact `xla` reference, forward and dq/dk/dv, plus TPU lowering of both via jax.export.

Tolerances: float32 inputs match the reference to rtol = atol = 1e-5 (outputs and all three
gradients; the kernel reorders the softmax sums, nothing else); bfloat16 inputs to 2e-2 (bf16
rounding of p and dS before the matmuls, as in every flash kernel).
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_tiles import batches, cache_batches, cache_view, stack

from pdjax.attention import attention, pallas_attention, reference_attention, splash_dense_attention
from pdjax.structure import Segments, pack_documents, segments_from_tokens, strip_plan
from structures import IDS, enc

LENGTH = 96  # six 16-token tiles: enough tiles for EMPTY / PARTIAL / FULL to mix
WINDOW = 32  # cache queries: two 16-token tiles over the 96-slot cache
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _with_grads(fn):
    """jit of (q, k, v, q_seg, kv_seg, cotangent) -> (out, (dq, dk, dv)) for an attention fn."""

    @jax.jit
    def run(q, k, v, q_seg, kv_seg, ct):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, q_seg, kv_seg), q, k, v)
        return out, vjp(ct)

    return run


@pytest.fixture(scope="module")
def kernel():
    return _with_grads(functools.partial(pallas_attention, block_q=16, block_kv=16, interpret=True))


@pytest.fixture(scope="module")
def reference():
    return _with_grads(reference_attention)


def _inputs(seed: int, b: int, t: int, s: int, nq=HEADS, nkv=KV_HEADS, h=HEAD_DIM, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, ct = (jnp.asarray(rng.standard_normal((b, t, nq, h)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, nkv, h)), dtype) for _ in range(2))
    return q, k, v, ct


def _assert_matches(got, want, tol):
    (out, grads), (ref_out, ref_grads) = got, want
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), err_msg=name, **tol)


@settings(max_examples=12, deadline=None)
@given(batches(length=LENGTH, batch=2), st.integers(0, 2**16))
def test_kernel_matches_reference_on_packed_rows(kernel, reference, rows, seed):
    """Sparse and dense groups, AR-only, diffusion-only, packed documents and padding."""
    q, k, v, ct = _inputs(seed, 2, LENGTH, LENGTH)
    _assert_matches(kernel(q, k, v, rows, rows, ct), reference(q, k, v, rows, rows, ct), F32_TOL)


@settings(max_examples=8, deadline=None)
@given(cache_batches(length=LENGTH, window=WINDOW, batch=2), st.integers(0, 2**16))
def test_kernel_matches_reference_on_cache_queries(kernel, reference, views, seed):
    """Queries shorter than keys: a window of the row over a KV cache with unwritten (NEVER) slots."""
    q_seg, kv_seg = views
    q, k, v, ct = _inputs(seed, 2, WINDOW, LENGTH)
    _assert_matches(kernel(q, k, v, q_seg, kv_seg, ct), reference(q, k, v, q_seg, kv_seg, ct), F32_TOL)



@settings(max_examples=6, deadline=None)
@given(cache_batches(length=LENGTH, window=WINDOW, batch=2), st.integers(0, 2**16))
def test_reference_in_query_blocks_equals_whole_rows(reference, views, seed):
    """A decoding call's bounded scores: queries in blocks (here of 8, with a padded last block) give each row the
    values of the whole-row computation, to float32 rounding (XLA may sum a block's dot products in another order)."""
    from pdjax.attention.reference import query_block

    q_seg, kv_seg = views
    t = WINDOW - 3  # not a multiple of the block
    q_seg = Segments(*(a[:, :t] for a in q_seg))
    q, k, v, _ = _inputs(seed, 2, t, LENGTH)
    budget = 2 * HEADS * LENGTH * 4 * 8  # the scores of 8 queries
    assert query_block(2, t, HEADS, LENGTH, budget) == 8 and query_block(2, t, HEADS, LENGTH, 10 * budget) == t
    assert query_block(2, t, HEADS, LENGTH, budget // 64) == 8  # not even one query's scores fit: the smallest block
    whole = jax.jit(reference_attention)(q, k, v, q_seg, kv_seg)
    blocks = jax.jit(functools.partial(reference_attention, score_bytes=budget))(q, k, v, q_seg, kv_seg)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), rtol=1e-5, atol=1e-6)


# The paper's Aurora example (as in test_structure_masks): two rounds, one <sync/>, a final group.
AURORA = enc(
    "Aurora ? <promise>-<topic> what 1 </topic> <promise>-<topic> why 1 </topic> "
    "<async> lights [PAD] </async> <async> sun </async> <sync/> "
    "<promise>-<topic> so 1 </topic> <async> pretty </async> <|im_end|>"
)


def aurora_row(length: int) -> Segments:
    """Aurora packed three times (planned, dense, AR-only) then padded: a fixed row for the hand tests."""
    stripped = strip_plan(AURORA, IDS, 2)
    docs = [
        (np.asarray(AURORA), segments_from_tokens(AURORA, 2, IDS, mode="planned")),
        (np.asarray(AURORA), segments_from_tokens(AURORA, 2, IDS, mode="dense")),
        (stripped, segments_from_tokens(stripped, 2, IDS, mode="ar_only")),
    ]
    return pack_documents(docs, length, pad_id=0)[1]


def test_unwritten_cache_slots_are_neither_loaded_nor_computed(kernel, reference):
    """NaN keys/values in slots whose tiles are all EMPTY cannot reach the output or any gradient."""
    q_seg, kv_seg = (stack([x, x]) for x in cache_view(aurora_row(LENGTH), 32, WINDOW))  # slots >= 64 unwritten
    q, k, v, ct = _inputs(0, 2, WINDOW, LENGTH)
    unwritten = (np.arange(LENGTH) >= 64)[None, :, None, None]
    got = kernel(q, jnp.where(unwritten, jnp.nan, k), jnp.where(unwritten, jnp.nan, v), q_seg, kv_seg, ct)
    want = reference(q, jnp.where(unwritten, 0.0, k), jnp.where(unwritten, 0.0, v), q_seg, kv_seg, ct)
    _assert_matches(got, want, F32_TOL)
    dk, dv = got[1][1:]
    assert not np.asarray(dk)[:, 64:].any() and not np.asarray(dv)[:, 64:].any()


def test_rows_without_allowed_keys_give_zeros_and_zero_gradients(kernel, reference):
    q_seg, kv_seg = (stack([x, x]) for x in cache_view(aurora_row(LENGTH), 40, WINDOW))
    lonely = np.zeros((2, WINDOW), bool)
    lonely[0, :5] = lonely[1, 20:] = True  # a doc id no key has: nothing is allowed
    q_seg = q_seg._replace(doc_id=np.where(lonely, 99, q_seg.doc_id).astype(np.int32))
    q, k, v, ct = _inputs(1, 2, WINDOW, LENGTH)
    got = kernel(q, k, v, q_seg, kv_seg, ct)
    _assert_matches(got, reference(q, k, v, q_seg, kv_seg, ct), F32_TOL)
    out, (dq, _, _) = got
    assert not np.asarray(out)[lonely].any() and not np.asarray(dq)[lonely].any()
    assert all(np.isfinite(np.asarray(g)).all() for g in got[1])


def test_bfloat16_grouped_query_attention():
    """bf16 in, f32 accumulate; 6 query heads over 2 kv heads (groups of 3)."""
    rows = stack([aurora_row(LENGTH), aurora_row(LENGTH)])
    q, k, v, ct = _inputs(2, 2, LENGTH, LENGTH, nq=6, nkv=2, dtype=jnp.bfloat16)
    got = _with_grads(functools.partial(pallas_attention, block_q=32, block_kv=16, interpret=True))(
        q, k, v, rows, rows, ct
    )
    assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
    _assert_matches(got, _with_grads(reference_attention)(q, k, v, rows, rows, ct), BF16_TOL)


def test_entry_point_pads_lengths_that_are_not_whole_tiles():
    rows = stack([aurora_row(90), aurora_row(90)])
    q, k, v, _ = _inputs(4, 2, 90, 90)
    got = attention(q, k, v, rows, rows, impl="pallas_tpu", block_q=16, block_kv=16, interpret=True)
    np.testing.assert_allclose(got, reference_attention(q, k, v, rows, rows), **F32_TOL)


# ---------------------------------------------------------------- splash_dense baseline

SPLASH_LENGTH = 256  # splash needs key tiles of 128 lanes even when interpreted


@pytest.fixture(scope="module")
def splash():
    return _with_grads(functools.partial(splash_dense_attention, block_q=128, block_kv=128, interpret=True))


@settings(max_examples=3, deadline=None)
@given(batches(length=SPLASH_LENGTH, batch=2), st.integers(0, 2**16))
def test_splash_dense_matches_reference(splash, reference, rows, seed):
    q, k, v, ct = _inputs(seed, 2, SPLASH_LENGTH, SPLASH_LENGTH)
    _assert_matches(splash(q, k, v, rows, rows, ct), reference(q, k, v, rows, rows, ct), F32_TOL)


# ---------------------------------------------------------------- TPU lowering

DREAM_HEADS, DREAM_KV_HEADS, DREAM_HEAD_DIM = 28, 4, 128  # Dream-7B attention (METHOD §5)


def _export_for_tpu(impl: str, t: int, s: int):
    """jax.export for TPU of the forward and of the backward (dq, dk, dv) at bf16, 28/4 heads, H=128."""
    shape = jax.ShapeDtypeStruct
    q = shape((1, t, DREAM_HEADS, DREAM_HEAD_DIM), jnp.bfloat16)
    kv = shape((1, s, DREAM_KV_HEADS, DREAM_HEAD_DIM), jnp.bfloat16)
    q_seg = Segments(*[shape((1, t), jnp.int32)] * 5)
    kv_seg = Segments(*[shape((1, s), jnp.int32)] * 5)

    def forward(q, k, v, q_seg, kv_seg):
        return attention(q, k, v, q_seg, kv_seg, impl=impl)

    def backward(q, k, v, q_seg, kv_seg):
        loss = lambda q, k, v: forward(q, k, v, q_seg, kv_seg).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    texts = []
    for fn in (forward, backward):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(q, kv, kv, q_seg, kv_seg)
        texts.append(exported.mlir_module())
    return texts


@pytest.mark.parametrize("t", [4096, 128], ids=["training", "cache"])
def test_pallas_tpu_lowers_for_tpu(t):
    fwd, bwd = _export_for_tpu("pallas_tpu", t, 4096)
    assert fwd.count("tpu_custom_call") == 1  # the forward kernel
    assert bwd.count("tpu_custom_call") == 3  # forward with log-sum-exp, dq, dk/dv


def test_splash_dense_lowers_for_tpu():
    fwd, bwd = _export_for_tpu("splash_dense", 4096, 4096)
    assert fwd.count("tpu_custom_call") >= 1 and bwd.count("tpu_custom_call") >= 3


# Compiling (not only lowering) for a TPU needs libtpu (in the test extra, pinned as jax's tpu extra pins it),
# which compiles Mosaic kernels for a TPU topology without TPU hardware: forward and backward for TPU v5e and
# v6e, in a fresh process (the test process is pinned to the CPU platform).
_COMPILE_FOR_TPU = """
import sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from pdjax.attention import attention
from pdjax.structure import Segments

for name in sys.argv[1:]:
    device = topologies.get_topology_desc(topology_name=name, platform="tpu").devices[0]
    shape = lambda s, d: jax.ShapeDtypeStruct(s, d, sharding=jax.sharding.SingleDeviceSharding(device))
    q = shape((1, 4096, 28, 128), jnp.bfloat16)
    kv = shape((1, 4096, 4, 128), jnp.bfloat16)
    seg = Segments(*[shape((1, 4096), jnp.int32)] * 5)
    fwd = lambda q, k, v, s: attention(q, k, v, s, s, impl="pallas_tpu")
    bwd = jax.grad(lambda q, k, v, s: fwd(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    for fn in (fwd, bwd):
        jax.jit(fn).lower(q, kv, kv, seg).compile()
    print("compiled for", name)
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e '.[test]')")
def test_pallas_tpu_compiles_for_tpu_with_libtpu():
    from pdjax.aot.topology import compile_environment

    env = compile_environment()
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_TPU, "v5e:2x2", "v6e:2x2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["compiled for v5e:2x2", "compiled for v6e:2x2"]
