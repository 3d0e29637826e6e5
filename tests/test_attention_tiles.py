"""Tile planning (pdjax.attention.tiles): hand cases with exact counts, and conservativeness
against the dense rule `pdjax.structure.allowed` on random well-formed rows.

Also home of the row strategies the kernel tests share (`packed_rows`, `batches`, `cache_batches`).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdjax.attention.tiles import (
    TileClass,
    fetch_plan,
    kernel_plan,
    pad_segments,
    tile_classes,
    tile_report,
)
from pdjax.structure import MODES, NEVER, Segments, allowed, pack_documents, segments_from_tokens, strip_plan
from structures import IDS, responses

E, P, F = TileClass.EMPTY, TileClass.PARTIAL, TileClass.FULL


# ---------------------------------------------------------------- row strategies


@st.composite
def packed_rows(draw, length: int, max_docs: int = 3) -> Segments:
    """One packed row of `length`: 1..max_docs documents in random layouts (planned, dense,
    AR-only, diffusion-only), then padding. Documents that do not fit are dropped."""
    docs = []
    used = 0
    for _ in range(draw(st.integers(1, max_docs))):
        ex = draw(responses(max_rounds=2, max_promises=2))
        mode = draw(st.sampled_from(MODES))
        toks = ex.tokens
        if mode in ("ar_only", "diffusion_only"):
            toks = strip_plan(toks, IDS, ex.prompt_len)
        if used + len(toks) > length:
            continue
        docs.append((np.asarray(toks, np.int32), segments_from_tokens(toks, ex.prompt_len, IDS, mode=mode)))
        used += len(toks)
    if not docs:  # the first document alone did not fit: fall back to a causal prompt-only row
        toks = [100] * (length - 1) + [IDS.eos]
        docs.append((np.asarray(toks, np.int32), segments_from_tokens(toks, length - 1, IDS, mode="ar_only")))
    return pack_documents(docs, length, pad_id=0)[1]


def stack(rows: list[Segments]) -> Segments:
    """Rows [L] to a batch [B, L] of int32."""
    return Segments(*(np.stack([getattr(r, f) for r in rows]).astype(np.int32) for f in Segments._fields))


@st.composite
def batches(draw, length: int, batch: int) -> Segments:
    """A batch of independent packed rows (queries and keys are the same tokens)."""
    return stack([draw(packed_rows(length)) for _ in range(batch)])


def cache_view(row: Segments, start: int, window: int) -> tuple[Segments, Segments]:
    """Queries row[start:start+window] over a KV cache of the whole row whose slots from
    start+window on are not written yet (visible_from NEVER, block 0), as in decoding."""
    q = Segments(*(a[start : start + window] for a in row))
    unwritten = np.arange(row.length) >= start + window
    kv = row._replace(
        visible_from=np.where(unwritten, NEVER, row.visible_from).astype(np.int32),
        block_id=np.where(unwritten, 0, row.block_id).astype(np.int32),
    )
    return q, kv


@st.composite
def cache_batches(draw, length: int, window: int, batch: int) -> tuple[Segments, Segments]:
    """(query segments [B, window], cache segments [B, length]) with a random window per row."""
    qs, kvs = [], []
    for _ in range(batch):
        row = draw(packed_rows(length))
        q, kv = cache_view(row, draw(st.integers(0, length - window)), window)
        qs.append(q)
        kvs.append(kv)
    return stack(qs), stack(kvs)


# ---------------------------------------------------------------- hand cases


def seg(block, visible, position, doc) -> Segments:
    """A one-row batch of segment ids, written out by hand."""
    arrs = [np.asarray([x], np.int32) for x in (block, visible, position, doc)]
    return Segments(*arrs, role=np.zeros_like(arrs[0]))


def causal(n: int, doc: int = 1, start: int = 0) -> list[list[int]]:
    pos = list(range(start, start + n))
    return [[0] * n, pos, pos, [doc] * n]


def concat(*parts: list[list[int]]) -> list[list[int]]:
    return [sum((p[f] for p in parts), []) for f in range(4)]


def test_causal_document_splits_into_diagonal_lower_and_upper_tiles():
    s = seg(*causal(8))
    np.testing.assert_array_equal(tile_classes(s, s, 4, 4)[0], [[P, E], [F, P]])
    r = tile_report(s, s, 4, 4, num_q_heads=2, head_dim=8)
    assert (r.tiles, r.empty, r.partial, r.full) == (4, 1, 2, 1)
    assert r.visited_fraction == 0.75
    assert r.dense_flops == 4 * 2 * 8 * 8 * 8  # 4 * heads * head_dim * T * S
    assert r.kernel_flops == 4 * 2 * 8 * 3 * 4 * 4
    assert r.flops_saved == 0.25


def test_packed_documents_do_not_meet():
    s = seg(*concat(causal(4, doc=1), causal(4, doc=2)))
    np.testing.assert_array_equal(tile_classes(s, s, 4, 4)[0], [[P, E], [E, P]])


def test_block_released_by_sync():
    # 0-3 plan (causal), 4-7 one block released by the <sync/> at 8, 8-11 plan.
    s = seg(
        [0] * 4 + [1] * 4 + [0] * 4,
        [0, 1, 2, 3] + [8] * 4 + [8, 9, 10, 11],
        list(range(12)),
        [1] * 12,
    )
    np.testing.assert_array_equal(tile_classes(s, s, 4, 4)[0], [[P, E, E], [F, F, E], [F, F, P]])
    r = tile_report(s, s, 4, 4)
    assert (r.empty, r.partial, r.full) == (3, 2, 4)


def test_sibling_blocks_of_one_group_are_empty_to_each_other():
    # prompt 0-3, blocks 1 and 2 of one group (4-7, 8-11), never released (no <sync/>).
    s = seg(
        [0] * 4 + [1] * 4 + [2] * 4,
        [0, 1, 2, 3] + [NEVER] * 8,
        list(range(12)),
        [1] * 12,
    )
    np.testing.assert_array_equal(tile_classes(s, s, 4, 4)[0], [[P, E, E], [F, F, E], [F, E, F]])


def test_cache_queries_over_unwritten_slots():
    # cache of 12 slots: 0-3 plan, 4-7 the block being denoised (the queries), 8-11 unwritten.
    kv = seg([0] * 4 + [1] * 4 + [0] * 4, [0, 1, 2, 3] + [NEVER] * 8, list(range(12)), [1] * 12)
    q = seg([1] * 4, [NEVER] * 4, [4, 5, 6, 7], [1] * 4)
    np.testing.assert_array_equal(tile_classes(q, kv, 4, 4)[0], [[F, F, E]])
    r = tile_report(q, kv, 4, 4)
    assert (r.tiles, r.empty, r.full) == (3, 1, 2)
    assert r.flops_saved == pytest.approx(1 / 3)


def test_lengths_are_padded_to_whole_tiles():
    # 10 causal tokens in tiles of 4: padded to 12; padded queries/keys match nothing.
    s = seg(*causal(10))
    padded_q = pad_segments(s, 12, keys=False)
    padded_k = pad_segments(s, 12, keys=True)
    assert np.asarray(padded_q.doc_id)[0, 10:].tolist() == [-1, -1]
    assert np.asarray(padded_k.visible_from)[0, 10:].tolist() == [NEVER, NEVER]
    assert not np.asarray(allowed(padded_q, padded_k))[0, 10:].any()
    assert not np.asarray(allowed(padded_q, padded_k))[0, :, 10:].any()
    r = tile_report(s, s, 4, 4)
    assert (r.tiles, r.empty, r.partial, r.full) == (9, 3, 5, 1)
    assert r.dense_flops == 4 * 128 * 10 * 10
    assert r.kernel_flops == 4 * 128 * 6 * 16  # padding makes the kernel cost more than 6 tiles' worth of real pairs


def test_fetch_plan_hand_case():
    classes = np.array([[[E, P, E, F], [E, E, E, E], [P, E, E, E]]])
    np.testing.assert_array_equal(fetch_plan(classes)[0], [[1, 1, 1, 3], [3, 3, 3, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(kernel_plan(classes)[0, 0], [4 * 1 + E, 4 * 1 + P, 4 * 1 + E, 4 * 3 + F])
    np.testing.assert_array_equal(fetch_plan(np.full((1, 2, 2), E))[0], [[0, 0], [0, 0]])


# ---------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.sampled_from([E, P, F]), min_size=5, max_size=5), min_size=4, max_size=4))
def test_empty_steps_reuse_the_block_already_loaded(rows):
    classes = np.asarray(rows)[None]
    fetch = np.asarray(fetch_plan(classes))[0].reshape(-1)
    flat = classes[0].reshape(-1)
    cols = classes.shape[-1]
    visited = np.flatnonzero(flat != E)
    for step, c in enumerate(flat):
        if c != E:
            assert fetch[step] == step % cols  # a visited step loads its own key tile
        elif step > 0 and (visited < step).any():
            assert fetch[step] == fetch[step - 1]  # no new copy
        elif len(visited):
            assert fetch[step] == visited[0] % cols  # the block the first visited step needs


def _check_conservative(q: Segments, kv: Segments, bq: int, bkv: int) -> None:
    classes = np.asarray(tile_classes(q, kv, bq, bkv))
    mask = np.asarray(allowed(q, kv))
    b, t, s = mask.shape
    tiles = mask.reshape(b, t // bq, bq, s // bkv, bkv).swapaxes(2, 3)
    assert not tiles[classes == E].any(), "a tile planned EMPTY has an allowed pair"
    assert tiles[classes == F].all(), "a tile planned FULL has a masked pair"


@settings(max_examples=40, deadline=None)
@given(batches(length=96, batch=2), st.sampled_from([(8, 8), (16, 32), (32, 16)]))
def test_plan_is_conservative_on_packed_rows(rows, blocks):
    _check_conservative(rows, rows, *blocks)


@settings(max_examples=30, deadline=None)
@given(cache_batches(length=96, window=32, batch=2))
def test_plan_is_conservative_on_cache_queries(views):
    _check_conservative(*views, 8, 16)
