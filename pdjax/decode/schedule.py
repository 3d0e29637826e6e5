"""How many masks each span unmasks per denoising step, and which ones (METHOD §4).

A group denoises for ``steps = int(max_span_length * steps_ratio)`` steps (at
least 1) on the timesteps ``linspace(1, eps, steps + 1)``, eps = 1e-3. At step
i every span with masks left unmasks ``k = max(1, int(masked * (1 - s/t)))``
of them (s, t = timesteps i+1, i), and all of them on the last step: its top-k
masked positions by confidence.

With eps = 1/1000 the ratio is exact in integers:
``1 - s/t = 999 / (1000 * steps - 999 * i)``, so ``k = 999 * masked // (1000 *
steps - 999 * i)`` is computed without floating point (the released float32
code can differ by one where the product lands on an integer).

Confidence-threshold variant (τ): per span the budget at step i is
``max(1, masked // (steps - i))`` (1 once i >= steps) plus what earlier steps
left untaken; of the top-``budget`` masked positions the first is always taken
and the others only if their sampled token's probability is >= τ; the loop
continues past ``steps`` until no mask is left.

Ranks break confidence ties by position (the earlier position first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-3
_EPS_DEN = 1000  # eps = 1 / _EPS_DEN, so 1 - s/t is the rational (den - 1) / (den * steps - (den - 1) * i)


def steps_table(max_length: int, steps_ratio: float) -> np.ndarray:
    """[max_length + 1] int32: denoising steps of a group whose longest span holds L masks.

    ``int(L * steps_ratio)`` in Python floats (as the reference), at least 1 when L > 0
    (the reference would run no step at all and leave masks behind).
    """
    if not steps_ratio > 0:
        raise ValueError(f"steps_ratio must be > 0, got {steps_ratio}")
    lengths = np.arange(max_length + 1)
    steps = np.array([int(n * steps_ratio) for n in lengths], np.int64)
    return np.where(lengths > 0, np.maximum(steps, 1), 0).astype(np.int32)


def unmask_counts(masked: jax.Array, step: jax.Array, steps: jax.Array) -> jax.Array:
    """Masks to unmask at step `step` of `steps`, per span: `masked` [..., K] int32 -> [..., K].

    0 for spans with no mask left; every remaining mask on the last scheduled step (or later).
    """
    masked = jnp.asarray(masked, jnp.int32)
    step = jnp.asarray(step, jnp.int32)[..., None]
    steps = jnp.asarray(steps, jnp.int32)[..., None]
    den = jnp.maximum(_EPS_DEN * steps - (_EPS_DEN - 1) * step, 1)
    k = jnp.maximum(1, ((_EPS_DEN - 1) * masked) // den)
    k = jnp.where(step >= steps - 1, masked, k)
    return jnp.minimum(k, masked)


def threshold_budget(masked: jax.Array, carry: jax.Array, step: jax.Array, steps: jax.Array) -> jax.Array:
    """Positions each span considers at step `step` in the threshold variant: [..., K] -> [..., K].

    ``max(1, masked // (steps - step))`` (1 once step >= steps), plus the carried-over budget,
    capped at the masks left; 0 for spans with no mask left.
    """
    masked = jnp.asarray(masked, jnp.int32)
    step = jnp.asarray(step, jnp.int32)[..., None]
    steps = jnp.asarray(steps, jnp.int32)[..., None]
    base = jnp.where(step < steps, masked // jnp.maximum(steps - step, 1), 0)
    return jnp.minimum(jnp.maximum(base, 1) + carry, masked)


def rank_within_spans(confidence: jax.Array, span: jax.Array, eligible: jax.Array) -> jax.Array:
    """[G] int32: rank of each eligible position among the eligible positions of its span, by confidence.

    0 is the most confident; ties go to the earlier position. Ineligible positions get ranks
    that no span budget reaches (they sort after every span).
    """
    n = confidence.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    key = jnp.where(eligible, span, jnp.iinfo(jnp.int32).max)
    sorted_key, _, sorted_index = jax.lax.sort((key, -confidence, index), num_keys=2, is_stable=True)
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_key[1:] != sorted_key[:-1]])
    run_start = jax.lax.cummax(jnp.where(starts, index, 0))
    rank_sorted = jnp.where(sorted_key == jnp.iinfo(jnp.int32).max, n, index - run_start)
    return jnp.zeros((n,), jnp.int32).at[sorted_index].set(rank_sorted)


def select_scheduled(rank: jax.Array, span: jax.Array, counts: jax.Array) -> jax.Array:
    """[G] bool: positions whose rank is below their span's count (`counts` [K], `span` [G] in [0, K))."""
    return rank < counts[jnp.clip(span, 0, counts.shape[-1] - 1)]


def select_threshold(
    rank: jax.Array, span: jax.Array, budget: jax.Array, prob: jax.Array, threshold: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Threshold variant: ([G] bool taken, [K] int32 carried budget).

    Among each span's top-``budget`` positions the first is always taken, the others only when
    ``prob`` (the sampled token's probability) >= threshold; the rejected ones carry over.
    """
    k = budget.shape[-1]
    span_c = jnp.clip(span, 0, k - 1)
    considered = rank < budget[span_c]
    taken = considered & ((rank == 0) | (prob >= threshold))
    rejected = (considered & ~taken).astype(jnp.int32)
    carry = jax.ops.segment_sum(rejected, span_c, num_segments=k)
    return taken, carry
