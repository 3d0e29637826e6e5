"""Sampling, schedules and the on-device plan layout, each against a plain NumPy/Python reference."""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.decode import layout as lay
from pdjax.decode import schedule as sch
from pdjax.decode.sampling import SamplingParams, filter_logits, sample
from pdjax.structure import parse_response
from structures import IDS, enc, plan_banned

FILTER, SAMPLE = jax.jit(filter_logits), jax.jit(sample)  # one compile: the knobs are traced


# ---- schedules ------------------------------------------------------------------------------


def method_count(masked: int, i: int, steps: int) -> int:
    """METHOD §4: k = max(1, int(masked * (1 - s/t))) on linspace(1, eps, steps + 1), all on the last step."""
    if masked == 0:
        return 0
    if i >= steps - 1:
        return masked
    eps = Fraction(1, 1000)
    t, s = (1 + j * (eps - 1) / steps for j in (i, i + 1))
    return min(masked, max(1, int(masked * (1 - s / t))))


def test_unmask_counts_equal_method_formula():
    steps = np.arange(1, 41)
    masked = np.arange(0, 81)
    grid_s, grid_i, grid_m = np.meshgrid(steps, np.arange(40), masked, indexing="ij")
    keep = grid_i < grid_s
    got = np.asarray(
        jax.jit(sch.unmask_counts)(jnp.asarray(grid_m[keep])[:, None], jnp.asarray(grid_i[keep]),
                                   jnp.asarray(grid_s[keep]))
    )[:, 0]
    want = [method_count(m, i, s) for m, i, s in zip(grid_m[keep], grid_i[keep], grid_s[keep])]
    assert got.tolist() == want


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7, 1.0])
def test_steps_table_is_int_of_length_times_ratio(ratio):
    table = sch.steps_table(200, ratio)
    assert table[0] == 0
    assert table[1:].tolist() == [max(1, int(n * ratio)) for n in range(1, 201)]


def test_rank_and_selection_per_span():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g, k = 24, 4
        span = np.sort(rng.integers(0, k, g))
        conf = rng.integers(0, 5, g).astype(np.float32)  # many ties: earlier position first
        eligible = rng.random(g) < 0.7
        rank = np.asarray(sch.rank_within_spans(jnp.asarray(conf), jnp.asarray(span), jnp.asarray(eligible)))
        counts = rng.integers(0, 6, k)
        picked = np.asarray(sch.select_scheduled(jnp.asarray(rank), jnp.asarray(span), jnp.asarray(counts)))
        prob = rng.random(g).astype(np.float32)
        budget = rng.integers(0, 6, k)
        taken, carry = sch.select_threshold(jnp.asarray(rank), jnp.asarray(span), jnp.asarray(budget),
                                            jnp.asarray(prob), jnp.float32(0.5))
        want_pick, want_taken, want_carry = np.zeros(g, bool), np.zeros(g, bool), np.zeros(k, int)
        for s in range(k):
            members = [p for p in range(g) if span[p] == s and eligible[p]]
            order = sorted(members, key=lambda p: (-conf[p], p))
            assert [rank[p] for p in order] == list(range(len(order)))
            want_pick[order[: counts[s]]] = True
            for r, p in enumerate(order[: budget[s]]):
                if r == 0 or prob[p] >= 0.5:
                    want_taken[p] = True
                else:
                    want_carry[s] += 1
        assert (picked & eligible).tolist() == want_pick.tolist()
        assert (np.asarray(taken) & eligible).tolist() == want_taken.tolist()
        assert np.asarray(carry).tolist() == want_carry.tolist()


def test_threshold_budget():
    masked = jnp.asarray([[10, 3, 0, 7]])
    carry = jnp.asarray([[2, 0, 0, 9]])
    got = sch.threshold_budget(masked, carry, jnp.asarray([1]), jnp.asarray([5]))
    # max(1, masked // (steps - i)) + carry, capped at masked
    assert got.tolist() == [[min(10, 10 // 4 + 2), 1, 0, 7]]
    late = sch.threshold_budget(masked, carry, jnp.asarray([6]), jnp.asarray([5]))
    assert late.tolist() == [[3, 1, 0, 7]]  # past the scheduled steps: 1 + carry


# ---- sampling -------------------------------------------------------------------------------


def reference_filter(logits: np.ndarray, temperature: float, top_p: float | None, top_k: int | None) -> np.ndarray:
    """The released order: / temperature, top-p (first kept, ties at the cut kept), then top-k."""
    x = logits / temperature if temperature > 0 else logits.copy()
    if top_p is not None and top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x.max())
        cum = np.cumsum(p / p.sum())
        kept = 1 + int(np.sum(cum[:-1] <= top_p))
        x = np.where(x < x[order][kept - 1], -np.inf, x)
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    return x


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(0.0, None, None), (0.7, 0.9, None), (1.3, None, 5),
                                                            (0.5, 0.8, 3), (0.0, 0.5, 10)])
def test_filter_and_confidences_match_numpy(temperature, top_p, top_k):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (6, 40)).astype(np.float32)
    for alg in ("entropy", "maskgit_plus", "topk_margin"):
        params = SamplingParams.make(temperature, top_p, top_k, alg)
        got = np.asarray(FILTER(jnp.asarray(logits), params))
        want = np.stack([reference_filter(r, temperature, top_p, top_k) for r in logits.astype(np.float64)])
        assert np.array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
        keys = jax.random.split(jax.random.key(3), 6)
        drawn = SAMPLE(keys, jnp.asarray(logits), params)
        probs = np.exp(want - want.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        token = np.asarray(drawn.token)
        if temperature == 0:
            assert token.tolist() == probs.argmax(-1).tolist()
        assert np.all(np.isfinite(want[np.arange(6), token]))  # sampled inside the filtered support
        prob = probs[np.arange(6), token]
        np.testing.assert_allclose(np.asarray(drawn.prob), prob, rtol=1e-5)
        top = np.sort(probs, -1)
        want_conf = {
            "entropy": np.sum(probs * np.log(probs + 1e-10), -1),
            "maskgit_plus": prob,
            "topk_margin": top[:, -1] - top[:, -2],
        }[alg]
        np.testing.assert_allclose(np.asarray(drawn.confidence), want_conf, rtol=1e-5, atol=1e-6)


def test_sampling_follows_the_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    params = SamplingParams.make(1.0, 0.9, None)  # the nucleus drops the 0.05 token
    tokens = np.asarray(SAMPLE(keys, jnp.broadcast_to(logits, (4000, 4)), params).token)
    freq = np.bincount(tokens, minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.03)


# ---- layout ---------------------------------------------------------------------------------


DIGIT_VALUE = jnp.asarray(lay.digit_values(IDS, 200))


def test_parse_promises_matches_parse_response():
    plan = enc("intro <promise>-<topic> a b 1 2 </topic> x <promise>-<topic> 7 c 3 </topic> "
               "<promise>-<topic> d 0 5 </topic> <promise>-<topic> 4 </topic> tail")
    tokens = enc("old text <sync/>") + plan
    start = 3
    numbers, count = lay.parse_promises(jnp.asarray(tokens + [0] * 5), start, len(tokens), IDS, DIGIT_VALUE, 8)
    parsed = parse_response(tokens, IDS, start, allow_truncated=True).rounds[-1].promises
    assert int(count) == len(parsed) == 4
    assert np.asarray(numbers)[:4].tolist() == [p.number for p in parsed] == [12, 7, 5, 4]
    assert np.asarray(numbers)[4:].tolist() == [0] * 4


def test_plan_group_budget_and_write():
    lengths = jnp.asarray([5, 4, 3, 0])
    group = lay.plan_group(lengths, jnp.int32(3), jnp.int32(10), 30)  # spare = 30 - 10 - 6 - 1 = 13
    assert np.asarray(group.length).tolist() == [5, 4, 3, 0] and bool(group.fits)
    short = lay.plan_group(lengths, jnp.int32(3), jnp.int32(10), 24)  # spare = 7
    assert np.asarray(short.length).tolist() == [5, 2, 0, 0] and int(short.size) == 13
    none = lay.plan_group(lengths, jnp.int32(3), jnp.int32(10), 16)
    assert not bool(none.fits)
    tokens = np.asarray(lay.write_group(jnp.zeros(30, jnp.int32), jnp.int32(10), short, IDS))
    a, b, m = IDS.async_start, IDS.async_end, IDS.mask
    assert tokens[10:23].tolist() == [a, m, m, m, m, m, b, a, m, m, b, a, b]
    assert tokens[:10].tolist() == [0] * 10 and tokens[23:].tolist() == [0] * 7


def test_grammar_matches_the_documented_rules():
    rng = np.random.default_rng(0)
    vocab = [IDS.promise_start, IDS.promise_end, *IDS.digits, 100, 101]
    step = jax.jit(lambda g, t: lay.grammar_step(g, t, IDS, DIGIT_VALUE))
    bias = jax.jit(lambda g: lay.grammar_bias(g, IDS, 200, 2))
    for _ in range(30):
        state, plan = lay.Grammar.fresh(), []
        for _ in range(14):
            banned = {t for t in range(200) if np.isneginf(np.asarray(bias(state))[t])}
            assert banned == plan_banned(plan, 2)
            choices = [t for t in vocab if t not in banned]
            tok = int(rng.choice(choices))
            plan.append(tok)
            state = step(state, jnp.int32(tok))


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, -1, -(2**31), 2**32 + 7])
def test_host_knobs_equal_make_knobs(seed):
    """The server's NumPy knobs (no JAX dispatch) and make_knobs equal knobs built with JAX's own scalars and
    PRNG key, leaf for leaf, the raw key included."""
    from pdjax.decode.decoder import DecodeOptions, Knobs, host_knobs, make_knobs

    for options in (DecodeOptions(seed=seed),
                    DecodeOptions(seed=seed, temperature=0.7, top_p=None, top_k=5, alg="topk_margin",
                                  confidence_threshold=0.9, dense=True, steps_ratio=0.25, length_scale=7.5,
                                  max_new_tokens=33)):
        want = Knobs(
            SamplingParams.make(options.temperature, options.top_p, options.top_k, options.alg),
            jnp.float32(-1.0 if options.confidence_threshold is None else options.confidence_threshold),
            jnp.bool_(options.dense),
            jnp.asarray(sch.steps_table(96, options.steps_ratio)),
            jnp.asarray(lay.length_table(options.length_scale)),
            jax.random.key_data(jax.random.key(options.seed)),
            jnp.int32(96 if options.max_new_tokens is None else options.max_new_tokens),
        )
        got = host_knobs(options, 96)
        made = make_knobs(options, 96)
        made = made._replace(key=jax.random.key_data(made.key))
        for w, g, m in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(made), strict=True):
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
            assert isinstance(m, jax.Array) and m.dtype == w.dtype and m.shape == w.shape
            np.testing.assert_array_equal(g, np.asarray(w))
            np.testing.assert_array_equal(np.asarray(m), np.asarray(w))
