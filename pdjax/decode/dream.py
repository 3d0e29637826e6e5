"""Dream's own sampler (`diffusion_generate` of Dream-v0-*-7B, the paper's "Dream" baseline), reproduced.

METHOD §4, last paragraphs. Per prompt, x = prompt + ``max_new_tokens`` `<|mask|>`;
``steps = int(max_new_tokens * steps_ratio)``; timesteps ``linspace(1, eps, steps + 1)``
(eps 1e-3). Every step runs the whole sequence with full bidirectional attention
(prompt included; no KV cache) and shifts the logits right by one (the
prediction for position j is read at j-1). At step i, with t, s = timesteps[i],
timesteps[i + 1]:

- ``maskgit_plus`` / ``topk_margin`` / ``entropy``: sample a token and its
  confidence at every mask from the distribution after temperature, top-p and
  top-k (Dream's ``sample_tokens``: `pdjax.decode.sampling.sample`), then
  transfer ``int(num_mask * (1 - s/t))`` masks (all that remain at the last
  step; zero is allowed): the top-k by confidence, or with ``alg_temp > 0`` k
  positions drawn without replacement from softmax(confidence / alg_temp).
- ``origin``: each mask is transferred with probability ``1 - s/t`` (1 at the
  last step), its token sampled the same way.

No token is banned (a sampled `<|mask|>` stays a mask). The answer is read up to
the first eos. Arithmetic follows Dream's float32 tensors: the timesteps are
torch's ``linspace`` formula in float32, ``1 - s/t`` is rounded to float32 and the
product with the mask count is truncated. Dream averages the mask count over the
batch; here each row counts its own masks (the same at batch size 1, and for
every alg but ``origin`` whenever rows start with equal budgets).

The loop is one jit-compiled program per (batch, window, step-table) shape:
`lax.fori_loop` over steps with a traced bound, so prompt lengths, budgets and
knobs never recompile.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.decode.api import DecodeInputError, DecodeResult, vocab_size_of
from pdjax.decode.forward import Forward, full_logits, model_forward
from pdjax.decode.sampling import SamplingParams, sample
from pdjax.decode.stats import DecodeStats
from pdjax.model.transformer import shift_logits
from pdjax.structure import Segments

DREAM_ALGS: tuple[str, ...] = ("origin", "maskgit_plus", "topk_margin", "entropy")
DREAM_EPS = 1e-3
NEVER = 2**30  # `visible_from` of tokens that only their own block sees


@dataclasses.dataclass(frozen=True)
class DreamOptions:
    """Run-time knobs of Dream's sampler (Dream's names); changing them never recompiles.

    ``max_new_tokens`` None: ``max_length - prompt`` masks per prompt (the released
    ``--dream_baseline``). ``top_p`` None or 1 and ``top_k`` None or 0 turn them off.
    """

    steps_ratio: float = 1.0
    alg: str = "entropy"
    alg_temp: float = 0.0
    temperature: float = 0.2
    top_p: float | None = 0.95
    top_k: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None
    eps: float = DREAM_EPS

    def __post_init__(self) -> None:
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"unknown alg {self.alg!r} for mode dream; expected one of {DREAM_ALGS}")
        if self.steps_ratio <= 0:
            raise ValueError(f"steps_ratio must be > 0, got {self.steps_ratio}")
        if self.alg_temp < 0:
            raise ValueError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.sampling()  # validates temperature, top_p, top_k

    def sampling(self) -> SamplingParams:
        """The token sampler's knobs; the confidence is the alg's (unused by ``origin``)."""
        top_p = None if self.top_p is None or self.top_p >= 1 else self.top_p
        alg = "maskgit_plus" if self.alg == "origin" else self.alg
        return SamplingParams.make(self.temperature, top_p, self.top_k or None, alg)

    @classmethod
    def from_options(cls, options: Any, **changes: Any) -> "DreamOptions":
        """Dream options from any options object with the shared field names (e.g. a `DecodeOptions`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        found = {n: getattr(options, n) for n in names if hasattr(options, n)}
        return cls(**{**found, **changes})


@dataclasses.dataclass(frozen=True)
class DreamSamplerConfig:
    """What fixes the compiled shapes: ``max_length`` (prompt + answer), ``batch_size``, window ``buckets``."""

    max_length: int = 2048
    batch_size: int = 1
    buckets: tuple[int, ...] = ()
    mode: str = dataclasses.field(default="dream", init=False)

    def __post_init__(self) -> None:
        if self.max_length < 2 or self.batch_size < 1 or any(b < 1 for b in self.buckets):
            raise ValueError("max_length must be >= 2, batch_size >= 1 and buckets positive")

    @property
    def windows(self) -> tuple[int, ...]:
        """The sorted static sequence widths (default: powers of two from 32, then max_length)."""
        sizes = self.buckets or tuple(2**p for p in range(5, 31) if 2**p < self.max_length)
        return tuple(sorted({min(b, self.max_length) for b in sizes} | {self.max_length}))


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n)`` in float32 by torch's kernel formula (the first half counts up from
    start, the second down from end), so Dream's timesteps are reproduced bit for bit."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    up = start32 + step * i.astype(np.float32)
    down = end32 - step * (n - 1 - i).astype(np.float32)
    return np.where(i < n // 2, up, down).astype(np.float32)


def schedule(steps: int, eps: float = DREAM_EPS) -> np.ndarray:
    """float32 ``1 - s/t`` of each step (Dream's transfer fraction), the last step set to 1 (transfer all)."""
    t = torch_linspace(1.0, eps, steps + 1)
    fraction = (np.float32(1.0) - t[1:] / t[:-1]).astype(np.float32)
    fraction[-1] = 1.0
    return fraction


class _Batch(NamedTuple):
    tokens: jax.Array  # [B, L] prompt, masks, then filler
    valid: jax.Array  # [B, L] prompt and masks
    fraction: jax.Array  # [B, S] float32 1 - s/t per step (1 at each row's last step)
    steps: jax.Array  # [B]
    seed: jax.Array  # int32 scalar; row r draws from row_key(seed, r)


def row_key(seed: int | jax.Array, row: int | jax.Array) -> jax.Array:
    """The PRNG key of batch row `row` (per-step keys are folded in from it)."""
    return jax.random.fold_in(jax.random.key(seed), row)


def step_keys(key: jax.Array, step: int | jax.Array, length: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-position sampling keys [L], position-choice key, origin key) of one row at one step."""
    k_tokens, k_choice, k_origin = jax.random.split(jax.random.fold_in(key, step), 3)
    return jax.random.split(k_tokens, length), k_choice, k_origin


def origin_uniforms(seed: int, row: int, step: int, length: int) -> np.ndarray:
    """The uniforms that decide `origin`'s transfers (mask j moves when u[j] < 1 - s/t): for tests and audits."""
    _, _, k = step_keys(row_key(seed, row), step, length)
    return np.asarray(jax.random.uniform(k, (length,)))


def full_segments(valid: jax.Array) -> Segments:
    """Segment ids of full bidirectional attention over each row's valid tokens (filler sees only filler)."""
    b, length = valid.shape
    block = jnp.where(valid, 1, 2).astype(jnp.int32)
    position = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    zeros = jnp.zeros((b, length), jnp.int32)
    return Segments(block, jnp.full((b, length), NEVER, jnp.int32), position, zeros, zeros)


class _Program:
    """The jit-compiled sampler: ``run(params, batch, knobs) -> tokens [B, L]``."""

    def __init__(self, forward: Forward, mask_id: int):
        self.forward = forward
        self.mask_id = mask_id

    def run(self, params: Any, batch: _Batch, sampling: SamplingParams, alg: jax.Array,
            alg_temp: jax.Array) -> jax.Array:
        b, length = batch.tokens.shape
        segments = full_segments(batch.valid)
        keys = jax.vmap(lambda r: row_key(batch.seed, r))(jnp.arange(b))

        def step(i: jax.Array, x: jax.Array) -> jax.Array:
            logits, _ = full_logits(self.forward, params, x, segments)
            logits = shift_logits(logits)
            live = i < batch.steps  # rows whose schedule is not finished
            masked = (x == self.mask_id) & batch.valid & live[:, None]
            token_keys, choice_keys, origin_keys = jax.vmap(lambda k: step_keys(k, i, length))(keys)
            drawn = sample(token_keys, logits, sampling)
            num = jnp.sum(masked, axis=-1)
            fraction = jax.lax.dynamic_index_in_dim(batch.fraction, i, axis=1, keepdims=False)
            # Dream: int(num_mask * (1 - s/t)) in float32, every remaining mask at the last step
            last = i == batch.steps - 1
            k = jnp.where(last, num, jnp.floor(num.astype(jnp.float32) * fraction).astype(jnp.int32))
            score = jnp.where(masked, drawn.confidence, -jnp.inf)
            gumbel = jax.vmap(lambda key: jax.random.gumbel(key, (length,)))(choice_keys)
            # alg_temp > 0: k positions without replacement from softmax(confidence / alg_temp) (Gumbel top-k)
            score = jnp.where(alg_temp > 0, score / jnp.where(alg_temp > 0, alg_temp, 1.0) + gumbel, score)
            order = jnp.argsort(-score, axis=-1, stable=True)
            rank = jnp.argsort(order, axis=-1, stable=True)
            by_rank = masked & (rank < k[:, None])
            u = jax.vmap(lambda key: jax.random.uniform(key, (length,)))(origin_keys)
            by_chance = masked & (u < fraction[:, None])
            transfer = jnp.where(alg == 0, by_chance, by_rank)
            return jnp.where(transfer, drawn.token, x)

        return jax.lax.fori_loop(0, jnp.max(batch.steps), step, batch.tokens)


class DreamDecoder:
    """Dream's `diffusion_generate` over batches of prompts; the same interface as `pdjax.decode.Decoder`.

    ``mask_id`` is `<|mask|>`; ``eos_ids`` end an answer (it is read up to the first of them).
    """

    def __init__(self, forward: Forward, *, mask_id: int, eos_ids: Sequence[int],
                 config: DreamSamplerConfig = DreamSamplerConfig()):
        self.forward = forward
        self.config = config
        self.mask_id = int(mask_id)
        self.eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))
        if not self.eos_ids:
            raise DecodeInputError("mode 'dream' needs at least one eos id to read answers")
        self.eos_id = self.eos_ids[0]
        self.vocab_size = vocab_size_of(forward)
        bad = [i for i in (self.mask_id, *self.eos_ids) if not 0 <= i < self.vocab_size]
        if bad:
            raise DecodeInputError(f"mask/eos ids {bad} are outside the model's vocabulary ({self.vocab_size})")
        self._run = jax.jit(_Program(forward, self.mask_id).run)

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "DreamDecoder":
        """A decoder for an NNX `DreamModel` (split once; see `model_forward`)."""
        return cls(model_forward(model), **kwargs)

    def compiled_programs(self) -> int:
        """How many programs have been compiled so far (one per batch, window and step-table shape)."""
        return int(self._run._cache_size())

    def check_prompt(self, prompt: Sequence[int], index: int = 0, max_new_tokens: int | None = None) -> list[int]:
        """The prompt as ints, or a `DecodeInputError` saying why it cannot be decoded (empty, too long for its
        masks under ``max_length``, ids outside the vocabulary)."""
        ids = [int(t) for t in prompt]
        limit = self.config.max_length
        if not ids:
            raise DecodeInputError(f"prompt {index} is empty")
        need = len(ids) + (max_new_tokens or 1)
        if need > limit:
            raise DecodeInputError(f"prompt {index} has {len(ids)} tokens: with {max_new_tokens or 1} masks it needs "
                                   f"max_length >= {need}, not {limit}")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise DecodeInputError(f"prompt {index} has token ids outside the vocabulary ({self.vocab_size}): {bad[:5]}")
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], options: Any = DreamOptions(),
                 params: Any = None) -> list[DecodeResult]:
        """Decode every prompt (chat template applied); results in prompt order. ``options``: `DreamOptions`,
        or options with the same field names (a `DecodeOptions`: its ``alg``, no ``alg_temp``)."""
        if not isinstance(options, DreamOptions):
            options = DreamOptions.from_options(options)
        checked = [self.check_prompt(p, i, options.max_new_tokens) for i, p in enumerate(prompts)]
        params = self.forward.params if params is None else params
        b = self.config.batch_size
        out: list[DecodeResult] = []
        for start in range(0, len(checked), b):
            out.extend(self._batch(checked[start : start + b], options, params))
        return out

    def _batch(self, prompts: list[list[int]], options: DreamOptions, params: Any) -> list[DecodeResult]:
        c = self.config
        budgets = [options.max_new_tokens or c.max_length - len(p) for p in prompts]
        steps = [int(n * options.steps_ratio) for n in budgets]
        if min(steps) < 1:
            i = steps.index(min(steps))
            raise DecodeInputError(f"prompt {i}: steps = int({budgets[i]} masks * steps_ratio {options.steps_ratio}) "
                                   "is 0; raise steps_ratio or max_new_tokens")
        width = next(w for w in c.windows if w >= max(len(p) + n for p, n in zip(prompts, budgets)))
        table = 1 << max(5, (max(steps) - 1).bit_length())  # step-table width: a power of two
        tokens = np.zeros((c.batch_size, width), np.int32)
        valid = np.zeros((c.batch_size, width), bool)
        fraction = np.ones((c.batch_size, table), np.float32)
        n_steps = np.zeros((c.batch_size,), np.int32)  # filler rows: no steps
        for i, (p, n, s) in enumerate(zip(prompts, budgets, steps)):
            tokens[i, : len(p)] = p
            tokens[i, len(p) : len(p) + n] = self.mask_id
            valid[i, : len(p) + n] = True
            fraction[i, :s] = schedule(s, options.eps)
            n_steps[i] = s
        batch = _Batch(tokens, valid, fraction, n_steps, np.int32(options.seed))
        alg = np.int32(DREAM_ALGS.index(options.alg))
        t0 = time.perf_counter()
        x = np.asarray(jax.device_get(self._run(params, batch, options.sampling(), alg, np.float32(options.alg_temp))))
        wall = time.perf_counter() - t0
        results = []
        for i, (p, n, s) in enumerate(zip(prompts, budgets, steps)):
            answer = [int(t) for t in x[i, len(p) : len(p) + n]]
            ends = [j for j, t in enumerate(answer) if t in self.eos_ids]
            finish = "eos" if ends else "length"
            answer = answer[: ends[0] + 1] if ends else answer
            stats = DecodeStats(model_calls=s, prefill_calls=0, plan_calls=0, denoise_calls=s, commit_calls=0,
                                tokens_generated=len(answer), rounds=0, groups=0, spans=0, span_lengths=[],
                                finish_reason=finish, wall_time_s=wall, batch_size=c.batch_size,
                                loop_iterations=int(max(steps)))
            results.append(DecodeResult(p, answer, stats))
        return results


def dream_decoder(forward: Forward, tokenizer: Any, config: DreamSamplerConfig, ids: Any = None,
                  eos_id: int | None = None, special: Any = None) -> DreamDecoder:
    """A `DreamDecoder` for a tokenizer: mask and stop ids from `special` (a `pdjax.model.tokenizer.SpecialIds`,
    the checkpoint's checked ids), else from the control ids / the tokenizer's `<|mask|>` and ``eos_id``."""
    mask = special.mask if special is not None else None
    if mask is None:
        mask = ids.mask if ids is not None else tokenizer.get_vocab().get("<|mask|>")
    if mask is None:
        raise DecodeInputError("mode 'dream' needs a <|mask|> token: neither the configs nor the tokenizer name one")
    stop = list(special.stop) if special is not None else []
    if eos_id is not None:
        stop.insert(0, int(eos_id))
    return DreamDecoder(forward, mask_id=mask, eos_ids=stop, config=config)


def answer_text(tokenizer: Any, token_ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """The answer a user reads: the tokens up to the first eos, special tokens skipped."""
    ids = list(token_ids)
    cut = next((j for j, t in enumerate(ids) if t in set(eos_ids)), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


__all__ = ["DREAM_ALGS", "DreamDecoder", "DreamOptions", "DreamSamplerConfig", "dream_decoder", "origin_uniforms",
           "schedule", "torch_linspace"]
