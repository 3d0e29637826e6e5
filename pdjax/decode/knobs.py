"""What fixes a decoding program and what a run may change: `DecodeConfig` (one compile per value),
`DecodeOptions` (the released decoder's knobs) and their traced form `Knobs`, which `host_knobs` builds
in NumPy without a JAX dispatch (a serving engine makes one per request on its event loop).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.decode import layout as lay
from pdjax.decode import schedule as sch
from pdjax.decode.sampling import ALGS, SamplingParams

DecodeMode = Literal["pd", "ar", "diffusion"]
DECODE_MODES: tuple[str, ...] = ("pd", "ar", "diffusion")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """What fixes a compiled program: mode, shapes and buckets (hashable; one compile per value).

    ``max_length`` counts prompt + response. ``buckets`` are the static window sizes of
    prefill, denoising and commit calls (default: powers of two from 32, then ``max_length``).
    ``max_spans`` bounds the promises of one round (the plan grammar stops opening more).
    ``profile`` adds host callbacks that time each kind of model call (off by default: the
    default program makes no host round trip). ``sample_chunk`` is the most positions whose
    logits exist at once: a denoising call samples only its masked positions, that many at a
    time (0: as many as fit `SAMPLE_CHUNK_BYTES` of float32 logits). It bounds the decoder's
    temporaries (a window of 2,048 x Dream's 152,064-token vocabulary would be 1.2 GiB per array,
    per row) and changes no token.
    """

    mode: DecodeMode = "pd"
    max_length: int = 2048
    batch_size: int = 1
    max_spans: int = 16
    buckets: tuple[int, ...] = ()
    profile: bool = False
    sample_chunk: int = 0

    def __post_init__(self) -> None:
        if self.mode not in DECODE_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {DECODE_MODES}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1 or self.max_spans < 1:
            raise ValueError("batch_size and max_spans must be >= 1")
        if any(b < 1 for b in self.buckets):
            raise ValueError(f"buckets must be positive, got {self.buckets}")
        if self.sample_chunk < 0:
            raise ValueError(f"sample_chunk must be >= 0 (0: automatic), got {self.sample_chunk}")

    @property
    def windows(self) -> tuple[int, ...]:
        """The sorted static call widths: 1 (plan steps), the buckets, and max_length (every window fits)."""
        sizes = self.buckets or tuple(2**p for p in range(5, 31) if 2**p < self.max_length)
        return tuple(sorted({min(b, self.max_length) for b in sizes} | {1, self.max_length}))


SAMPLE_CHUNK_BYTES = 2**28  # float32 logits of one sampling chunk: 256 MiB ([256, 152,064] for Dream's vocabulary)


def sample_chunk(config: DecodeConfig, vocab_size: int) -> int:
    """Positions sampled at once (`DecodeConfig.sample_chunk`, or automatic): a power of two whose float32
    logits fit `SAMPLE_CHUNK_BYTES`, and no more than a call can hold (batch x max_length)."""
    if config.sample_chunk:
        return config.sample_chunk
    fits = max(1, SAMPLE_CHUNK_BYTES // (4 * vocab_size))
    return min(1 << (fits.bit_length() - 1), 1 << (config.batch_size * config.max_length - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Run-time knobs, with the released decoder's names; changing them never recompiles.

    ``confidence_threshold`` (None: off) switches to the threshold variant, which ranks by
    the sampled token's probability (the released ``pd_confidence_threshold``; ``alg`` is
    then unused). ``dense`` is PD-DA (``--disable_block_sparsity``): one block per group.
    ``max_new_tokens`` caps each response below ``max_length`` (in diffusion mode: exactly that
    many masks, prompt length permitting) without recompiling.
    """

    steps_ratio: float = 1.0
    confidence_threshold: float | None = None
    length_scale: float = 10.0
    alg: str = "entropy"
    temperature: float = 0.2
    top_p: float | None = 0.95
    top_k: int | None = None
    dense: bool = False
    seed: int = 0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.confidence_threshold is not None and not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}")
        SamplingParams.check(self.temperature, self.top_p, self.top_k, self.alg)  # no device: a default at import
        lay.length_table(self.length_scale)
        sch.steps_table(1, self.steps_ratio)


class Knobs(NamedTuple):
    """The traced form of `DecodeOptions`: every leaf a scalar (one run) or with a leading [B] axis (per row).

    The program works on per-row knobs (`per_row`), so the slots of a serving batch can hold
    requests with different settings in one compiled program.
    """

    sampling: SamplingParams
    threshold: jax.Array  # float32; < 0 means off
    dense: jax.Array  # bool
    steps: jax.Array  # [max_length + 1] int32: steps_table
    lengths: jax.Array  # [100] int32: length_table
    key: jax.Array  # typed PRNG key
    max_new: jax.Array  # int32: response budget per request (max_length when off)


def per_row(knobs: Knobs, batch: int) -> Knobs:
    """Knobs with a leading [batch] axis on every leaf (scalar leaves broadcast, per-row leaves kept)."""
    if knobs.threshold.ndim == 1:
        return knobs
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), knobs)


def make_knobs(options: DecodeOptions, max_length: int) -> Knobs:
    """Knobs for one run: `host_knobs` (tables in Python arithmetic, as the reference) as JAX arrays, the key typed."""
    knobs = host_knobs(options, max_length)
    return jax.tree.map(jnp.asarray, knobs._replace(key=None))._replace(key=jax.random.wrap_key_data(knobs.key))


def host_knobs(options: DecodeOptions, max_length: int) -> Knobs:
    """The knobs of `options` with NumPy leaves and the key as its raw data: one request's row of a serving batch.

    Built in NumPy without a JAX dispatch (the server builds one per request on its event loop);
    `make_knobs` is the same as JAX arrays (tests/test_decode_units.py checks both against JAX's own).
    """
    SamplingParams.check(options.temperature, options.top_p, options.top_k, options.alg)
    return Knobs(
        SamplingParams(np.asarray(options.temperature, np.float32),
                       np.asarray(1.0 if options.top_p is None else options.top_p, np.float32),
                       np.asarray(options.top_k or 0, np.int32), np.asarray(ALGS.index(options.alg), np.int32)),
        np.asarray(-1.0 if options.confidence_threshold is None else options.confidence_threshold, np.float32),
        np.asarray(options.dense, np.bool_),
        _steps_table(max_length, options.steps_ratio),
        _length_table(options.length_scale),
        _key_data(options.seed),
        np.asarray(max_length if options.max_new_tokens is None else options.max_new_tokens, np.int32),
    )


@functools.lru_cache(maxsize=64)
def _steps_table(max_length: int, steps_ratio: float) -> np.ndarray:
    table = sch.steps_table(max_length, steps_ratio)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=64)
def _length_table(length_scale: float) -> np.ndarray:
    table = lay.length_table(length_scale)
    table.flags.writeable = False
    return table


def _key_data(seed: int) -> np.ndarray:
    """`jax.random.key_data(jax.random.key(seed))` as uint32 NumPy: computed on the host for the default
    threefry keys of 32-bit seeds (the key is [0, seed mod 2**32]), else by JAX."""
    if (not jax.config.jax_enable_x64 and jax.config.jax_default_prng_impl == "threefry2x32"
            and -(2**31) <= seed < 2**32):
        return np.array([0, seed % 2**32], np.uint32)
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def stack_knobs(rows: list[Knobs]) -> Knobs:
    """Host knobs of B requests (`host_knobs`) as one per-row `Knobs` of [B, ...] NumPy arrays."""
    return jax.tree.map(lambda *xs: np.stack(xs), *rows)
