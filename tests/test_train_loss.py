"""The hybrid loss against a NumPy re-implementation of METHOD §3, both recipes, every mode.

The NumPy side reads each document's tokens itself (tags, blocks, the final
<|im_end|>), never the code under test; the mask draw is fixed by the test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdjax.structure import Segments, pack_documents, segments_from_tokens, strip_plan
from pdjax.structure import ar_targets as structure_ar_targets
from pdjax.train.loss import Corruption, LossConfig, ar_targets, corrupt, loss_terms, maskable
from structures import IDS, enc, responses

V = 512  # word ids from structures.enc are shared by every test module of the session
L = 48
PAD_ID = 0

DOCS = [
    # (prompt, response) — a planned answer with a <sync/> and two rounds
    (
        "u1 u2 u3",
        "<promise>-<topic> alpha 2 </topic> <promise>-<topic> beta 1 </topic> "
        "<async> a1 a2 [PAD] </async> <async> b1 </async> <sync/> gamma "
        "<promise>-<topic> delta 1 </topic> <async> c1 c2 </async> <|im_end|>",
    ),
    ("v1 v2", "hello world <|im_end|> nl"),  # plain text, with a chat-template tail after <|im_end|>
    ("w1", "<promise>-<topic> x 1 </topic> <async> d1 [PAD] </async> <|im_end|> nl"),
]
ROWS = [[0, 1], [2]]  # documents packed into each row


def _doc_tokens(i: int, mode: str) -> tuple[list[int], int]:
    prompt, response = DOCS[i]
    p, r = enc(prompt), enc(response)
    toks = p + r
    if mode in ("ar_only", "diffusion_only"):
        toks = [int(t) for t in strip_plan(toks, IDS, start=len(p))]
    return toks, len(p)


def _batch(mode: str, rows=ROWS):
    docs = [[_doc_tokens(i, mode) for i in row] for row in rows]
    toks, segs = [], []
    for row in docs:
        packed = [(np.asarray(t), segments_from_tokens(t, p, IDS, mode=mode)) for t, p in row]
        t, s = pack_documents(packed, L, PAD_ID)
        toks.append(t)
        segs.append(s)
    seg = Segments(*(np.stack([getattr(s, f) for s in segs]) for f in Segments._fields))
    return np.stack(toks), seg, docs


# ---- the NumPy re-implementation of METHOD §3 --------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _blocks(toks: list[int], prompt: int, mode: str) -> list[tuple[int, int]]:
    """(start, end) inclusive of every block, read from the tags (dense: touching blocks merged)."""
    if mode == "diffusion_only":
        return [(prompt - 1, len(toks) - 1)]
    if mode == "ar_only":
        return []
    out: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate(toks):
        if t == IDS.async_start:
            start = i
        elif t == IDS.async_end:
            if mode == "dense" and out and out[-1][1] == start - 1:
                out[-1] = (out[-1][0], i)
            else:
                out.append((start, i))
    return out


def _numpy_doc(logp, toks, prompt, mode, recipe, masked, t):
    """(sum of token losses, normaliser) of one document; logp [n, V] rows of this document."""
    n = len(toks)
    eos = toks.index(IDS.eos, prompt)
    blocks = _blocks(toks, prompt, mode)
    in_block = np.zeros(n, bool)
    for s, e in blocks:
        in_block[s : e + 1] = True
    tags = (IDS.async_start, IDS.async_end)
    total = 0.0
    if recipe == "pdjax":
        for i in range(prompt - 1, eos):  # AR: from the last prompt token, next token outside blocks
            if in_block[i]:
                continue
            j = next((k for k in range(i + 1, eos + 1) if not in_block[k]), None)
            if j is not None:
                total += -logp[i, toks[j]]
        for j in np.flatnonzero(masked):  # diffusion: masked j read at j-1, weighted 1/t
            total += -logp[j - 1, toks[j]] / t
        count = (n - prompt) if mode == "diffusion_only" else (eos - prompt + 1)
        return total, count
    # reference recipe: the released trainer's labels
    if mode == "ar_only":
        for i in range(prompt - 1, n - 1):
            total += -logp[i, toks[i + 1]]
        return total, n - prompt
    labels = {}
    if mode != "diffusion_only":
        for i in range(prompt - 1, eos + 1):
            if in_block[i]:
                continue
            j = next((k for k in range(i + 1, eos + 1) if not in_block[k]), None)
            labels[i] = toks[j] if j is not None else IDS.eos  # the final <|im_end|> predicts itself
        end = eos + 1
    else:
        end = n
    for s, e in blocks:
        for p in range(s, min(e, end - 1) + 1):
            if masked[p] and p + 1 <= e and toks[p + 1] not in tags:
                labels[p] = toks[p + 1]
    for p, y in labels.items():
        total += -logp[p, y] / t
    return total, (end - prompt + 1)


def _numpy_loss(logits, docs, masks, ts, mode, recipe, normalize):
    sums, counts = [], []
    for r, row in enumerate(docs):
        offset = 0
        for d, (toks, prompt) in enumerate(row):
            n = len(toks)
            logp = _log_softmax(logits[r, offset : offset + n])
            s, c = _numpy_doc(logp, toks, prompt, mode, recipe, masks[r][d], ts[r][d])
            sums.append(s)
            counts.append(c)
            offset += n
    if normalize == "document":
        return float(np.mean([s / c for s, c in zip(sums, counts)]))
    return float(sum(sums) / sum(counts))


def _numpy_maskable(toks, prompt, mode, recipe) -> np.ndarray:
    n = len(toks)
    out = np.zeros(n, bool)
    eos = toks.index(IDS.eos, prompt)
    for s, e in _blocks(toks, prompt, mode):
        if mode == "diffusion_only":
            lo = s if recipe == "reference" else prompt
            out[lo : e + 1] = True
        elif recipe == "reference":
            out[s : e + 1] = True
        else:
            out[s + 1 : e] = [toks[k] not in (IDS.async_start, IDS.async_end) for k in range(s + 1, e)]
    if mode != "diffusion_only":
        out[eos + 1 :] = False
    return out


def _fixed_draw(docs, mode, recipe, seed):
    """Per document: a mask over its maskable tokens and its t, drawn by NumPy."""
    rng = np.random.default_rng(seed)
    masks, ts = [], []
    for row in docs:
        masks.append([])
        ts.append([])
        for toks, prompt in row:
            t = float(rng.uniform(1e-3, 1.0))
            masks[-1].append(_numpy_maskable(toks, prompt, mode, recipe) & (rng.uniform(size=len(toks)) < max(t, 0.5)))
            ts[-1].append(t)
    return masks, ts


def _as_corruption(tokens, docs, masks, ts) -> Corruption:
    masked = np.zeros(tokens.shape, bool)
    t = np.ones(tokens.shape, np.float32)
    for r, row in enumerate(docs):
        offset = 0
        for d, (toks, _) in enumerate(row):
            masked[r, offset : offset + len(toks)] = masks[r][d]
            t[r, offset : offset + len(toks)] = ts[r][d]
            offset += len(toks)
    return Corruption(jnp.where(masked, IDS.mask, tokens), jnp.asarray(masked), jnp.asarray(t))


MODES = ("planned", "dense", "ar_only", "diffusion_only")


@pytest.mark.parametrize("normalize", ["document", "token"])
@pytest.mark.parametrize("recipe", ["pdjax", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_loss_equals_numpy_method(mode, recipe, normalize):
    tokens, seg, docs = _batch(mode)
    logits = np.random.default_rng(1).normal(size=(*tokens.shape, V)).astype(np.float32) * 3
    masks, ts = _fixed_draw(docs, mode, recipe, seed=MODES.index(mode) * 2 + (recipe == "reference"))
    noise = _as_corruption(tokens, docs, masks, ts)
    cfg = LossConfig(recipe=recipe, mode=mode, normalize=normalize)
    terms = loss_terms(jnp.asarray(logits), jnp.asarray(tokens), Segments(*map(jnp.asarray, seg)), noise, cfg)
    want = _numpy_loss(logits, docs, masks, ts, mode, recipe, normalize)
    np.testing.assert_allclose(float(terms.loss), want, rtol=2e-5)
    np.testing.assert_allclose(float(terms.ar_loss + terms.diffusion_loss), want, rtol=2e-5)
    if mode in ("ar_only", "diffusion_only"):  # a baseline trains only one of the two parts
        other = terms.diffusion_loss if mode == "ar_only" else terms.ar_loss
        assert float(other) == 0.0


def test_diffusion_part_alone_matches_numpy():
    """The AR and diffusion parts are reported separately: the diffusion part equals the masked-token sum."""
    tokens, seg, docs = _batch("planned")
    logits = np.random.default_rng(2).normal(size=(*tokens.shape, V)).astype(np.float32)
    masks, ts = _fixed_draw(docs, "planned", "pdjax", seed=5)
    noise = _as_corruption(tokens, docs, masks, ts)
    terms = loss_terms(jnp.asarray(logits), jnp.asarray(tokens), Segments(*map(jnp.asarray, seg)), noise, LossConfig())
    no_mask = [[np.zeros_like(m) for m in row] for row in masks]
    ar_only = _numpy_loss(logits, docs, no_mask, ts, "planned", "pdjax", "document")
    total = _numpy_loss(logits, docs, masks, ts, "planned", "pdjax", "document")
    np.testing.assert_allclose(float(terms.ar_loss), ar_only, rtol=2e-5)
    np.testing.assert_allclose(float(terms.diffusion_loss), total - ar_only, rtol=2e-5)
    assert float(terms.diffusion_loss) > 0


def test_document_normalisation_is_packing_invariant():
    """normalize=document: a packed row's loss is the mean of its documents' losses computed alone."""
    tokens, seg, docs = _batch("planned", rows=[[0, 1, 2]])
    logits = np.random.default_rng(3).normal(size=(*tokens.shape, V)).astype(np.float32)
    masks, ts = _fixed_draw(docs, "planned", "pdjax", seed=9)
    packed = loss_terms(
        jnp.asarray(logits), jnp.asarray(tokens), Segments(*map(jnp.asarray, seg)), _as_corruption(tokens, docs, masks, ts), LossConfig()
    )
    alone = []
    offset = 0
    for d in range(3):
        t1, s1, docs1 = _batch("planned", rows=[[d]])
        n = len(docs1[0][0][0])
        lg = np.zeros_like(logits)
        lg[:, :n] = logits[:, offset : offset + n]
        noise = _as_corruption(t1, docs1, [[masks[0][d]]], [[ts[0][d]]])
        alone.append(float(loss_terms(jnp.asarray(lg), jnp.asarray(t1), Segments(*map(jnp.asarray, s1)), noise, LossConfig()).loss))
        offset += n
    np.testing.assert_allclose(float(packed.loss), np.mean(alone), rtol=2e-5)
    token = loss_terms(
        jnp.asarray(logits),
        jnp.asarray(tokens),
        Segments(*map(jnp.asarray, seg)),
        _as_corruption(tokens, docs, masks, ts),
        LossConfig(normalize="token"),
    )
    assert abs(float(token.loss) - np.mean(alone)) > 1e-4  # the two choices really differ here


def test_loss_terms_add_over_micro_batches():
    """Summing the terms of two halves gives the loss of the whole batch (gradient accumulation)."""
    tokens, seg, docs = _batch("dense")
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(*tokens.shape, V)).astype(np.float32))
    masks, ts = _fixed_draw(docs, "dense", "pdjax", seed=3)
    noise = _as_corruption(tokens, docs, masks, ts)
    seg = Segments(*map(jnp.asarray, seg))
    cfg = LossConfig(mode="dense")
    whole = loss_terms(logits, jnp.asarray(tokens), seg, noise, cfg)
    halves = [
        loss_terms(logits[i : i + 1], jnp.asarray(tokens[i : i + 1]), Segments(*(a[i : i + 1] for a in seg)), Corruption(*(a[i : i + 1] for a in noise)), cfg)
        for i in range(2)
    ]
    np.testing.assert_allclose(float((halves[0] + halves[1]).loss), float(whole.loss), rtol=1e-6)


@pytest.mark.parametrize("recipe", ["pdjax", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_corrupt_masks_only_maskable_tokens_with_one_t_per_document(mode, recipe):
    tokens, seg, docs = _batch(mode)
    tokens = np.repeat(tokens, 64, axis=0)
    seg = Segments(*(np.repeat(a, 64, axis=0) for a in seg))
    cfg = LossConfig(recipe=recipe, mode=mode)
    noise = corrupt(jax.random.key(0), jnp.asarray(tokens), Segments(*map(jnp.asarray, seg)), mask_id=IDS.mask, cfg=cfg)
    masked, t = np.asarray(noise.masked), np.asarray(noise.t)
    allowed = np.zeros(tokens.shape[1], bool)
    offset = 0
    for row in docs[:1]:
        for toks, prompt in row:
            allowed[offset : offset + len(toks)] = _numpy_maskable(toks, prompt, mode, recipe)
            offset += len(toks)
    first = masked[:64]  # the 64 copies of the first row
    assert not first[:, ~allowed].any()
    if allowed.any():
        assert first[:, allowed].any()
        # the masked fraction follows t: E[masked | t] = t
        assert abs(first[:, allowed].mean() - t[:64][:, allowed].mean()) < 0.05
    np.testing.assert_array_equal(np.asarray(noise.tokens) == IDS.mask, masked)
    assert (t >= 1e-3).all() and (t <= 1.0).all()
    for b in (0, 1, 64, 65):
        for d in np.unique(seg.doc_id[b]):
            assert np.ptp(t[b][seg.doc_id[b] == d]) == 0  # one t per document
        assert len(np.unique(t[b])) == len(np.unique(seg.doc_id[b]))  # and a fresh one for each


_jit_ar_targets = jax.jit(ar_targets)


@settings(max_examples=40, deadline=None)
@given(st.lists(responses(), min_size=1, max_size=3), st.sampled_from(["planned", "dense"]))
def test_device_ar_targets_equal_structure_ar_targets(examples, mode):
    docs = [(np.asarray(ex.tokens), segments_from_tokens(ex.tokens, ex.prompt_len, IDS, mode=mode)) for ex in examples]
    tokens, seg = pack_documents(docs, 640, pad_id=PAD_ID)  # one shape: one compilation
    got = _jit_ar_targets(tokens[None], Segments(*(a[None] for a in seg)))
    np.testing.assert_array_equal(np.asarray(got)[0], structure_ar_targets(tokens, seg))


def test_maskable_sets():
    tokens, seg, _ = _batch("planned")
    seg_j = Segments(*map(jnp.asarray, seg))
    pd = np.asarray(maskable(seg_j, "pdjax"))
    ref = np.asarray(maskable(seg_j, "reference"))
    tags = np.isin(tokens, [IDS.async_start, IDS.async_end])
    assert not pd[tags].any() and ref[tags].all()
    assert pd[tokens == IDS.pad].all()
