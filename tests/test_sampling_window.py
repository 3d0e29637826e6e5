"""The nucleus without the vocabulary sort equals the sort's, bit for bit (filtered logits and samples).

The reference is the sort-based filter written here as the released decoder
defines it (descending sort, cumulative softmax, keep 1 + #{cum[:-1] <= top_p},
then at most top_k, ties at the cut kept). Inputs cover peaked, moderate and
flat distributions, heavy ties, exact powers of two whose cumulative mass hits
top_p exactly, -inf entries, per-row knobs, and temperature 0 and > 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdjax.decode import sampling
from pdjax.decode.sampling import SamplingParams, filter_logits, sample


def sorted_filter(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The released filter: / temperature, then the nucleus and top-k by a full descending sort."""
    x = logits.astype(jnp.float32)
    t = params.temperature.reshape(params.temperature.shape + (1,) * (x.ndim - params.temperature.ndim))
    p = params.top_p.reshape(params.top_p.shape + (1,) * (x.ndim - params.top_p.ndim))
    k = params.top_k.reshape(params.top_k.shape + (1,) * (x.ndim - params.top_k.ndim))
    x = x / jnp.where(t > 0, t, 1.0)
    ranked = -jnp.sort(-x, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    kept = 1 + jnp.sum(cum[..., :-1] <= p, axis=-1, keepdims=True)
    kept = jnp.where(k > 0, jnp.minimum(kept, k), kept)
    cut = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return jnp.where((x < cut) & ((p < 1.0) | (k > 0)), -jnp.inf, x)


FILTER = jax.jit(filter_logits)
SORTED = jax.jit(sorted_filter)
SAMPLE = jax.jit(sample)


@jax.jit
def sample_sorted(keys: jax.Array, logits: jax.Array, params: SamplingParams) -> sampling.Sample:
    """`sample` with the reference filter (temperature 1 after it: the division is already done)."""
    filtered = sorted_filter(logits, params)
    plain = params._replace(temperature=jnp.where(params.temperature > 0, 1.0, 0.0).astype(jnp.float32),
                            top_p=jnp.ones_like(params.top_p), top_k=jnp.zeros_like(params.top_k))
    return sample(keys, filtered, plain)


def logits_cases(vocab: int) -> dict[str, np.ndarray]:
    """[4, 16, vocab] float32 logits of several shapes of distribution."""
    rng = np.random.default_rng(vocab)
    shape = (4, 16, vocab)
    halves = np.log2(np.maximum(1, np.arange(vocab)))  # probabilities 2^-j-ish: cum hits 0.5, 0.75 exactly
    with_inf = rng.normal(0, 3, shape).astype(np.float32)
    with_inf[..., ::3] = -np.inf
    mixed = rng.normal(0, 1, shape) * rng.choice([0.05, 1.0, 4.0, 12.0], size=shape[:2] + (1,))
    return {
        "peaked": rng.normal(0, 12, shape).astype(np.float32),
        "moderate": rng.normal(0, 3, shape).astype(np.float32),
        "flat": rng.normal(0, 0.05, shape).astype(np.float32),
        "ties": (np.round(rng.normal(0, 3, shape) * 2) / 2).astype(np.float32),
        "few_values": rng.choice([0.0, 1.0, 5.0, 9.0], size=shape).astype(np.float32),
        "powers_of_two": np.broadcast_to(-halves * np.log(2.0), shape).astype(np.float32)
        + np.zeros(shape, np.float32),
        "with_inf": with_inf,
        "mixed": mixed.astype(np.float32),
    }


KNOBS = [(0.0, 0.95, None), (0.0, 0.5, None), (0.0, None, None), (0.7, 0.95, None), (1.3, 0.9, None),
         (0.0, 0.75, None), (0.0, None, 5), (0.5, 0.8, 3), (0.0, 0.95, 40), (0.0, 0.999, None), (2.0, 0.3, 1)]


@pytest.mark.parametrize("vocab", [1280, 160, 40, 2])
def test_filter_equals_the_sort_bit_for_bit(vocab):
    for name, logits in logits_cases(vocab).items():
        x = jnp.asarray(logits)
        for temperature, top_p, top_k in KNOBS:
            params = SamplingParams.make(temperature, top_p, top_k)
            got, want = np.asarray(FILTER(x, params)), np.asarray(SORTED(x, params))
            assert np.array_equal(got, want, equal_nan=True), (name, vocab, temperature, top_p, top_k)


def test_samples_equal_the_sort_bit_for_bit():
    keys = jax.random.split(jax.random.key(7), 64).reshape(4, 16)
    for name, logits in logits_cases(1280).items():
        x = jnp.asarray(logits)
        for temperature, top_p, top_k in KNOBS:
            for alg in sampling.ALGS:
                params = SamplingParams.make(temperature, top_p, top_k, alg)
                got, want = SAMPLE(keys, x, params), sample_sorted(keys, x, params)
                for field in ("token", "prob", "confidence"):
                    a, b = np.asarray(getattr(got, field)), np.asarray(getattr(want, field))
                    assert np.array_equal(a, b, equal_nan=True), (name, temperature, top_p, top_k, alg, field)


def test_per_row_knobs_equal_the_sort():
    logits = jnp.asarray(np.concatenate([c[:, :4] for c in logits_cases(1280).values()], axis=1))  # [4, 32, V]
    params = SamplingParams(temperature=jnp.asarray([0.0, 0.7, 0.0, 1.5], jnp.float32),
                            top_p=jnp.asarray([0.95, 0.5, 1.0, 0.9], jnp.float32),
                            top_k=jnp.asarray([0, 0, 4, 50], jnp.int32), alg=jnp.zeros(4, jnp.int32))
    assert np.array_equal(np.asarray(FILTER(logits, params)), np.asarray(SORTED(logits, params)))


def test_the_window_decides_peaked_rows_and_only_correctly():
    """The fast path is taken (not only the fallback), and every row it calls decided is the sort's."""
    window = jax.jit(sampling._nucleus_window)
    decided_total = 0
    for name, logits in logits_cases(1280).items():
        x = jnp.asarray(logits)
        for temperature, top_p, top_k in KNOBS:
            params = SamplingParams.make(0.0, top_p, top_k)
            fast, decided = (np.asarray(a) for a in window(x, params))
            want = np.asarray(SORTED(x, params))
            assert np.array_equal(fast[decided], want[decided]), (name, top_p, top_k)
            decided_total += int(decided.sum())
            if name == "peaked" and top_k is None and top_p is not None and top_p <= 0.95:
                assert decided.all(), (top_p, int((~decided).sum()))
            if name in ("flat", "few_values") and top_p is not None and top_p < 1 and top_k is None:
                assert not decided.any()  # nuclei of hundreds of tokens are beyond the window
    assert decided_total > 0


def test_unneeded_rows_do_not_force_the_sort():
    """Needed rows are the sort's whatever the other rows hold; a flat unneeded row keeps the fast path."""
    cases = logits_cases(1280)
    x = jnp.asarray(np.concatenate([cases["peaked"][:, :8], cases["flat"][:, :8]], axis=1))
    needed = jnp.asarray(np.arange(16) < 8)[None].repeat(4, 0)
    params = SamplingParams.make(0.0, 0.95)
    got = np.asarray(jax.jit(filter_logits)(x, params, needed))
    want = np.asarray(SORTED(x, params))
    assert np.array_equal(got[:, :8], want[:, :8])
    fast, _ = jax.jit(sampling._nucleus_window)(x, params)
    assert np.array_equal(got, np.asarray(fast))  # the flat rows kept the window's cut: no sort ran


@pytest.mark.parametrize("undecided", [0, 1, 3, 4, 5, 16, 17, 64, 65, 120])
def test_only_undecided_rows_are_sorted_and_equal_the_sort(undecided):
    """The undecided rows go to the sort in groups of 1, 4, 16, 64 or all (the others keep the window's cut):
    the same logits either way, at each group size and one past it."""
    cases = logits_cases(1280)
    params = SamplingParams.make(0.0, 0.95)

    def left(x: np.ndarray) -> np.ndarray:
        return ~np.asarray(jax.jit(sampling._nucleus_window)(jnp.asarray(x), params)[1])

    # nuclei of ~100 tokens or more: beyond the window
    pool = np.concatenate([cases["moderate"].reshape(-1, 1280), cases["flat"].reshape(-1, 1280)])
    hard = pool[left(pool)][:undecided]
    assert len(hard) == undecided
    x = np.concatenate([cases["peaked"].reshape(-1, 1280)] * 2)  # [128, V]
    rows = np.random.default_rng(undecided).permutation(128)[:undecided]
    x[rows] = hard
    assert left(x).sum() == undecided
    assert np.array_equal(np.asarray(FILTER(jnp.asarray(x), params)), np.asarray(SORTED(jnp.asarray(x), params)))


def test_argmax_equals_jnp_argmax():
    """Ties (first index), +-0, -inf rows, and arrays with NaNs (jnp.argmax's own rule) agree exactly."""
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(0, 2, (64, 40))).astype(np.float32)  # many ties at the max
    x[0] = -np.inf
    x[1, :] = 0.0
    x[1, ::2] = -0.0
    x[2, 5], x[2, 9] = np.inf, np.inf
    ours = jax.jit(sampling._argmax)
    assert np.array_equal(np.asarray(ours(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), -1)))
    x[3, 7], x[3, 2], x[5, 0] = np.nan, np.nan, np.nan
    assert np.array_equal(np.asarray(ours(jnp.asarray(x))), np.asarray(jnp.argmax(jnp.asarray(x), -1)))
    assert ours(jnp.asarray(x)).dtype == jnp.int32
