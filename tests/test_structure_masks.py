"""Segment ids, attention masks and AR targets against METHOD §2-§3, written out by hand."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdjax.structure import (
    NEVER,
    Role,
    Segments,
    allowed,
    ar_targets,
    attention_mask,
    pack_documents,
    segments_from_tokens,
    strip_plan,
)
from structures import IDS, Example, enc, parse_mask, responses

# The paper's Aurora example, shortened: two rounds, the first with two promises.
AURORA = enc(
    "Aurora ? "  # 0-1 prompt
    "<promise>-<topic> what 1 </topic> "  # 2-5
    "<promise>-<topic> why 1 </topic> "  # 6-9
    "<async> lights [PAD] </async> "  # 10-13
    "<async> sun </async> "  # 14-16
    "<sync/> "  # 17
    "<promise>-<topic> so 1 </topic> "  # 18-21
    "<async> pretty </async> "  # 22-24
    "<|im_end|>"  # 25
)
# Derived from allowed(i, j) of METHOD §2 by hand, one row per query.
AURORA_MASK = parse_mask(
    [
        "10000000000000000000000000",  # 0 Aurora
        "11000000000000000000000000",  # 1 ?
        "11100000000000000000000000",  # 2 <promise>
        "11110000000000000000000000",  # 3 what
        "11111000000000000000000000",  # 4 1
        "11111100000000000000000000",  # 5 </topic>
        "11111110000000000000000000",  # 6 <promise>
        "11111111000000000000000000",  # 7 why
        "11111111100000000000000000",  # 8 1
        "11111111110000000000000000",  # 9 </topic>
        "11111111111111000000000000",  # 10 <async>  block 1: prefix + itself
        "11111111111111000000000000",  # 11 lights
        "11111111111111000000000000",  # 12 [PAD]
        "11111111111111000000000000",  # 13 </async>
        "11111111110000111000000000",  # 14 <async>  block 2 does not see block 1
        "11111111110000111000000000",  # 15 sun
        "11111111110000111000000000",  # 16 </async>
        "11111111111111111100000000",  # 17 <sync/> releases the group
        "11111111111111111110000000",  # 18
        "11111111111111111111000000",  # 19
        "11111111111111111111100000",  # 20
        "11111111111111111111110000",  # 21
        "11111111111111111111111110",  # 22 <async>  block 3 sees the released group
        "11111111111111111111111110",  # 23
        "11111111111111111111111110",  # 24
        "11111111111111111111110001",  # 25 <|im_end|> never sees the last group
    ]
)


def test_aurora_segments_and_mask():
    seg = segments_from_tokens(AURORA, 2, IDS)
    np.testing.assert_array_equal(
        seg.block_id, [0] * 10 + [1] * 4 + [2] * 3 + [0] * 5 + [3] * 3 + [0]
    )
    np.testing.assert_array_equal(
        seg.visible_from, list(range(10)) + [17] * 7 + list(range(17, 22)) + [NEVER] * 3 + [25]
    )
    np.testing.assert_array_equal(seg.position, np.arange(26))
    np.testing.assert_array_equal(seg.doc_id, np.ones(26))
    expected_roles = [0, 0] + [1] * 8 + [2, 3, 3, 2, 2, 3, 2] + [1] * 5 + [2, 3, 2] + [1]
    np.testing.assert_array_equal(seg.role, expected_roles)
    np.testing.assert_array_equal(attention_mask(seg), AURORA_MASK)


def test_aurora_ar_targets_skip_groups():
    t = ar_targets(AURORA, segments_from_tokens(AURORA, 2, IDS))
    expected = np.full(26, -1)
    for i in range(1, 9):  # last prompt token and plan tokens predict the next plan token
        expected[i] = AURORA[i + 1]
    expected[9] = IDS.sync  # last promise token of round 1 predicts <sync/> after the group
    for i in range(17, 21):
        expected[i] = AURORA[i + 1]
    expected[21] = IDS.eos  # ... and of round 2 predicts <|im_end|>
    np.testing.assert_array_equal(t, expected)


def test_dense_groups_merge_the_spans_of_a_round():
    seg = segments_from_tokens(AURORA, 2, IDS, dense_groups=True)
    np.testing.assert_array_equal(seg.block_id, [0] * 10 + [1] * 7 + [0] * 5 + [2] * 3 + [0])
    m = attention_mask(seg)
    expected = AURORA_MASK.copy()
    expected[10:17, 10:17] = True  # the two spans of round 1 now see each other
    np.testing.assert_array_equal(m, expected)


def test_plain_answer_is_causal():
    toks = enc("hi there") + enc("hello world <|im_end|>")
    seg = segments_from_tokens(toks, 2, IDS)
    np.testing.assert_array_equal(attention_mask(seg), np.tril(np.ones((5, 5), bool)))
    np.testing.assert_array_equal(seg.role, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ar_targets(toks, seg), [-1, toks[2], toks[3], IDS.eos, -1])


def test_plain_text_tail_after_sync():
    toks = enc("q <promise>-<topic> a 1 </topic> <async> x y </async> <sync/> tail words <|im_end|>")
    #          0  1                  2 3  4        5      6 7  8        9      10   11    12
    seg = segments_from_tokens(toks, 1, IDS)
    np.testing.assert_array_equal(seg.visible_from, [0, 1, 2, 3, 4, 9, 9, 9, 9, 9, 10, 11, 12])
    m = attention_mask(seg)
    assert m[10, 5:9].all() and m[12, 5:9].all()  # the tail sees the released span
    assert not m[4, 5:9].any()
    t = ar_targets(toks, seg)
    np.testing.assert_array_equal(t, [toks[1], toks[2], toks[3], toks[4], IDS.sync, -1, -1, -1, -1, toks[10], toks[11], IDS.eos, -1])


def _doc(text: str, prompt_len: int = 1):
    toks = enc(text)
    return np.array(toks), segments_from_tokens(toks, prompt_len, IDS)


def test_packed_row_of_three_documents():
    d1 = _doc("q <promise>-<topic> 1 </topic> <async> x </async> <|im_end|>")
    d2 = _doc("q hi <|im_end|>")
    d3 = _doc("q <promise>-<topic> 2 </topic> <async> y </async> <|im_end|>")
    tokens, seg = pack_documents([d1, d2, d3], 21, pad_id=0)
    assert tokens.shape == (21,)
    np.testing.assert_array_equal(seg.doc_id, [1] * 8 + [2] * 3 + [3] * 8 + [0] * 2)
    np.testing.assert_array_equal(seg.position, list(range(8)) + list(range(3)) + list(range(8)) + [0, 1])
    np.testing.assert_array_equal(seg.block_id, [0, 0, 0, 0, 1, 1, 1, 0] + [0] * 3 + [0, 0, 0, 0, 2, 2, 2, 0] + [0, 0])
    np.testing.assert_array_equal(seg.role[-2:], [Role.PADDING] * 2)
    expected = parse_mask(
        [
            # doc1 (0-7)   doc2 (8-10) doc3 (11-18) pad (19-20)
            "10000000" "000" "00000000" "00",  # 0  q
            "11000000" "000" "00000000" "00",  # 1  <promise>
            "11100000" "000" "00000000" "00",  # 2  1
            "11110000" "000" "00000000" "00",  # 3  </topic>
            "11111110" "000" "00000000" "00",  # 4  <async>
            "11111110" "000" "00000000" "00",  # 5  x
            "11111110" "000" "00000000" "00",  # 6  </async>
            "11110001" "000" "00000000" "00",  # 7  <|im_end|>
            "00000000" "100" "00000000" "00",  # 8  q
            "00000000" "110" "00000000" "00",  # 9  hi
            "00000000" "111" "00000000" "00",  # 10 <|im_end|>
            "00000000" "000" "10000000" "00",  # 11 q
            "00000000" "000" "11000000" "00",  # 12
            "00000000" "000" "11100000" "00",  # 13
            "00000000" "000" "11110000" "00",  # 14
            "00000000" "000" "11111110" "00",  # 15 <async>
            "00000000" "000" "11111110" "00",  # 16 y
            "00000000" "000" "11111110" "00",  # 17 </async>
            "00000000" "000" "11110001" "00",  # 18 <|im_end|>
            "00000000" "000" "00000000" "10",  # 19 padding sees itself
            "00000000" "000" "00000000" "11",  # 20
        ]
    )
    np.testing.assert_array_equal(attention_mask(seg), expected)
    assert attention_mask(seg).any(axis=1).all()  # every row, padding included, has a key
    t = ar_targets(tokens, seg)
    e1, e3 = enc("<promise>-<topic> 1 </topic>"), enc("<promise>-<topic> 2 </topic>")
    np.testing.assert_array_equal(
        t,
        [e1[0], e1[1], e1[2], IDS.eos, -1, -1, -1, -1]
        + [enc("hi")[0], IDS.eos, -1]
        + [e3[0], e3[1], e3[2], IDS.eos, -1, -1, -1, -1]
        + [-1, -1],
    )


def test_pack_rejects_overflow():
    d = _doc("q hi <|im_end|>")
    with pytest.raises(ValueError, match="more than the row length"):
        pack_documents([d, d], 5, pad_id=0)


def test_ar_only_and_diffusion_only_layouts():
    toks = strip_plan(AURORA, IDS, start=2)
    np.testing.assert_array_equal(toks, enc("Aurora ? lights sun pretty <|im_end|>"))
    ar = segments_from_tokens(toks, 2, IDS, mode="ar_only")
    np.testing.assert_array_equal(attention_mask(ar), np.tril(np.ones((6, 6), bool)))
    np.testing.assert_array_equal(ar_targets(toks, ar), [-1] + list(toks[2:]) + [-1])
    diff = segments_from_tokens(toks, 2, IDS, mode="diffusion_only")
    expected = np.zeros((6, 6), bool)
    expected[0, 0] = True  # the prompt stays causal
    expected[1:, :] = True  # the anchor (last prompt token) and the response form one block
    np.testing.assert_array_equal(attention_mask(diff), expected)
    np.testing.assert_array_equal(diff.role, [Role.PROMPT, Role.PROMPT] + [Role.SPAN] * 4)
    np.testing.assert_array_equal(ar_targets(toks, diff), [-1] * 6)


def test_jnp_batched_mask_matches_numpy():
    seg = segments_from_tokens(AURORA, 2, IDS)
    batched = Segments(*(jnp.stack([jnp.asarray(a), jnp.asarray(a)]) for a in seg))
    m = np.asarray(allowed(batched, batched))
    assert m.shape == (2, 26, 26)
    np.testing.assert_array_equal(m[1], AURORA_MASK)
    # queries shorter than keys: the last 4 tokens against the whole row (a KV cache)
    q = Segments(*(a[:, -4:] for a in batched))
    np.testing.assert_array_equal(np.asarray(allowed(q, batched))[0], AURORA_MASK[-4:])


# ---------------------------------------------------------------- property tests


def _set_rule(ex: Example, blocks: list[set[int]], n: int) -> np.ndarray:
    """allowed(i, j) exactly as METHOD §2 states it, with blocks as sets of positions."""
    block_of = {p: b for b, s in enumerate(blocks) for p in s}
    m = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            if i in block_of and j in block_of and block_of[i] == block_of[j]:
                m[i, j] = True
            elif j not in block_of:
                m[i, j] = j <= i
            else:
                end_b = max(blocks[block_of[j]])
                m[i, j] = any(end_b < s <= i for s in ex.syncs)
    return m


def _released_mask(tokens: list[int], merge_touching: bool) -> np.ndarray:
    """The released training code's procedure, restated: start causal, then per finished block
    open it bidirectionally, hide it from every other row, and re-open all finished blocks to
    the rows from each <sync/> on. `merge_touching` is its block-sparsity ablation."""
    n = len(tokens)
    m = np.tril(np.ones((n, n), bool))
    open_at, done = None, []
    for i, tok in enumerate(tokens):
        starts = tok == IDS.async_start and not (merge_touching and i > 0 and tokens[i - 1] == IDS.async_end)
        ends = tok == IDS.async_end and open_at is not None and not (
            merge_touching and i + 1 < n and tokens[i + 1] == IDS.async_start
        )
        if starts:
            open_at = i
        elif ends:
            b = slice(open_at, i + 1)
            m[b, b] = True
            m[:open_at, b] = False
            m[i + 1 :, b] = False
            done.append(b)
            open_at = None
        elif open_at is None and tok == IDS.sync:
            for b in done:
                m[i:, b] = True
    return m


@settings(max_examples=150, deadline=None)
@given(responses())
def test_planned_rule_equals_set_definition_and_released_mask(ex: Example):
    seg = segments_from_tokens(ex.tokens, ex.prompt_len, IDS)
    m = attention_mask(seg)
    blocks = [set(range(s, e + 1)) for s, e in ex.spans]
    np.testing.assert_array_equal(m, _set_rule(ex, blocks, len(ex.tokens)))
    np.testing.assert_array_equal(m, _released_mask(ex.tokens, merge_touching=False))


@settings(max_examples=150, deadline=None)
@given(responses())
def test_dense_rule_equals_set_definition_and_released_mask(ex: Example):
    seg = segments_from_tokens(ex.tokens, ex.prompt_len, IDS, dense_groups=True)
    m = attention_mask(seg)
    blocks = [set().union(*(set(range(ex.spans[k][0], ex.spans[k][1] + 1)) for k in g)) for g in ex.groups]
    np.testing.assert_array_equal(m, _set_rule(ex, blocks, len(ex.tokens)))
    np.testing.assert_array_equal(m, _released_mask(ex.tokens, merge_touching=True))


@settings(max_examples=100, deadline=None)
@given(responses())
def test_ar_only_and_diffusion_only_equal_set_definition(ex: Example):
    toks = strip_plan(ex.tokens, IDS, ex.prompt_len)
    n, p = len(toks), ex.prompt_len
    ar = attention_mask(segments_from_tokens(toks, p, IDS, mode="ar_only"))
    np.testing.assert_array_equal(ar, np.tril(np.ones((n, n), bool)))
    plain = Example(list(toks), p, [], [], [], planned=False)
    block = [set(range(p - 1, n))]
    diff = attention_mask(segments_from_tokens(toks, p, IDS, mode="diffusion_only"))
    np.testing.assert_array_equal(diff, _set_rule(plain, block, n))


@settings(max_examples=100, deadline=None)
@given(responses())
def test_ar_targets_are_next_token_outside_blocks(ex: Example):
    seg = segments_from_tokens(ex.tokens, ex.prompt_len, IDS)
    t = ar_targets(ex.tokens, seg)
    in_block = {p for s, e in ex.spans for p in range(s, e + 1)}
    outside = [p for p in range(ex.prompt_len, len(ex.tokens)) if p not in in_block]
    expected = np.full(len(ex.tokens), -1)
    for i in [ex.prompt_len - 1] + outside:
        later = [q for q in outside if q > i]
        if later:
            expected[i] = ex.tokens[later[0]]
    np.testing.assert_array_equal(t, expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(responses(), min_size=1, max_size=3), st.integers(0, 4), st.booleans())
def test_packed_mask_is_block_diagonal(examples, extra, dense):
    docs = [
        (np.array(e.tokens), segments_from_tokens(e.tokens, e.prompt_len, IDS, dense_groups=dense))
        for e in examples
    ]
    length = sum(len(t) for t, _ in docs) + extra
    tokens, seg = pack_documents(docs, length, pad_id=0)
    m = attention_mask(seg)
    expected = np.zeros((length, length), bool)
    o = 0
    for t, s in docs:
        expected[o : o + len(t), o : o + len(t)] = attention_mask(s)
        o += len(t)
    expected[o:, o:] = np.tril(np.ones((extra, extra), bool))
    np.testing.assert_array_equal(m, expected)
    # AR targets never cross a document boundary
    t = ar_targets(tokens, seg)
    o = 0
    for toks, s in docs:
        np.testing.assert_array_equal(t[o : o + len(toks)], ar_targets(toks, s))
        o += len(toks)
