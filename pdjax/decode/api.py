"""The host side of decoding: validate prompts, batch them, run the compiled program, read results.

The host sees the device once per batch of `DecodeConfig.batch_size` prompts:
it uploads the padded prompts, and reads back the tokens and counters when the
while_loop has finished every example.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.decode.decoder import (
    CALL_KINDS,
    COMPILER_OPTIONS,
    FINISH_REASONS,
    DecodeConfig,
    DecodeOptions,
    Output,
    _Program,
    _Static,
    make_knobs,
)
from pdjax.decode.forward import Forward, model_forward
from pdjax.decode.stats import DecodeStats, Profiler
from pdjax.structure import ControlIds, Segments


class DecodeInputError(ValueError):
    """A request the decoder cannot serve (empty prompt, prompt too long, missing token ids)."""


@dataclasses.dataclass
class DecodeResult:
    """One decoded request: its prompt, the response token ids (control tokens included), and stats."""

    prompt_ids: list[int]
    token_ids: list[int]
    stats: DecodeStats


def vocab_size_of(forward: Forward) -> int:
    """The model's vocabulary size, from an abstract evaluation of its forward (no compute)."""
    one = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    cache = jax.eval_shape(lambda: forward.make_cache(1, 2))
    hidden, _ = jax.eval_shape(forward.apply, forward.params, one, Segments(*(one,) * 5), cache)
    index = jax.ShapeDtypeStruct((1,), jnp.int32)
    logits = jax.eval_shape(forward.head, forward.params, jax.ShapeDtypeStruct((1, hidden.shape[-1]), hidden.dtype),
                            index, index)
    return int(logits.shape[-1])


class Decoder:
    """Decodes batches of prompts with one compiled program per `DecodeConfig`.

    ``eos_id`` ends a response; ``ids`` (the control ids, digits included) is required by
    modes ``pd`` and ``diffusion``. Options (`DecodeOptions`) change per call without
    recompiling; prompts of any length up to ``max_length - 1`` reuse the same program.
    """

    def __init__(self, forward: Forward, *, eos_id: int, ids: ControlIds | None = None,
                 config: DecodeConfig = DecodeConfig()):
        self.forward = forward
        self.config = config
        self.eos_id = int(eos_id)
        self.ids = ids
        self.vocab_size = vocab_size_of(forward)
        self._check_ids()
        self.profiler = Profiler() if config.profile else None
        static = _Static(config, forward.apply, forward.make_cache, forward.head, self.eos_id, ids, self.vocab_size,
                         self.profiler)
        self._run = jax.jit(_Program(static).run, compiler_options=COMPILER_OPTIONS)
        self._compiled: set[tuple] = set()  # input signatures (shapes, dtypes, shardings) compiled so far
        self.on_compile: Callable[[str], None] | None = None  # told "compiling ..." before each compilation
        self._pending_compile_s = 0.0  # compile time not yet charged to a batch's stats
        self.on_batch: Callable[[int, int, int], None] | None = None  # told (first, end, total) before each batch

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "Decoder":
        """A decoder for an NNX `DreamModel` (split once; see `model_forward`)."""
        return cls(model_forward(model), **kwargs)

    def _check_ids(self) -> None:
        mode, v = self.config.mode, self.vocab_size
        if mode != "ar":
            if self.ids is None:
                raise DecodeInputError(f"mode {mode!r} needs the control token ids (ControlIds), got none")
            if mode == "pd" and len(self.ids.digits) != 10:
                raise DecodeInputError("mode 'pd' needs the ids of the digits '0'..'9' to read promise lengths")
            too_big = [i for i in (*self.ids.control_set, *self.ids.digits) if not 0 <= i < v]
            if too_big:
                raise DecodeInputError(f"control/digit token ids {sorted(too_big)} are outside the model's vocabulary ({v})")
            if self.ids.eos != self.eos_id:
                raise DecodeInputError(f"eos_id {self.eos_id} differs from the control ids' <|im_end|> {self.ids.eos}")
        if not 0 <= self.eos_id < v:
            raise DecodeInputError(f"eos id {self.eos_id} is outside the model's vocabulary ({v})")

    def compile(self, params: Any = None, options: DecodeOptions = DecodeOptions()) -> float:
        """Compile (or read from the persistent cache) the program for `params`' placement; returns seconds.

        `generate` calls it on a new input placement, so its wall times never include compilation; the
        time is reported in the next batch's `DecodeStats.compile_time_s`.
        """
        c = self.config
        params = self.forward.params if params is None else params
        tokens = np.zeros((c.batch_size, c.max_length + 1), np.int32)
        lengths = np.zeros((c.batch_size,), np.int32)
        knobs = make_knobs(options, c.max_length)
        key = self._signature((params, knobs))
        if key in self._compiled:
            return 0.0
        if self.on_compile is not None:
            self.on_compile(f"compiling the {c.mode} decoder for batch {c.batch_size} x {c.max_length} tokens ...")
        t0 = time.perf_counter()
        self._run.lower(params, tokens, lengths, knobs).compile()  # also fills jit's own cache for these inputs
        self._compiled.add(key)
        seconds = time.perf_counter() - t0
        self._pending_compile_s += seconds
        return seconds

    @staticmethod
    def _signature(params: Any) -> tuple:
        leaves = jax.tree.leaves(params)
        return tuple((np.shape(x), str(getattr(x, "dtype", "")), getattr(x, "sharding", None)) for x in leaves)

    def compiled_programs(self) -> int:
        """How many programs the decoder has compiled so far (one per batch shape; prompts never add any)."""
        return int(self._run._cache_size())

    def lower(self, sharding: Any = None, options: DecodeOptions = DecodeOptions()) -> Any:
        """The batch program lowered for the parameters' placement (a `jax.stages.Lowered`), without running it.

        ``sharding`` places the other inputs (prompts, knobs) as abstract arrays: with abstract parameters
        on a TPU topology's device (`pdjax.aot`), ``.compile()`` compiles for that chip on any machine.
        """
        c = self.config
        tokens = np.zeros((c.batch_size, c.max_length + 1), np.int32)
        lengths = np.zeros((c.batch_size,), np.int32)
        args = (tokens, lengths, make_knobs(options, c.max_length))
        if sharding is not None:
            args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), args)
        return self._run.lower(self.forward.params, *args)

    def export(self, platforms: Sequence[str] = ("tpu",), options: DecodeOptions = DecodeOptions()) -> Any:
        """The batch program lowered for `platforms` (a `jax.export.Exported`), e.g. to check TPU lowering."""
        c = self.config
        tokens = np.zeros((c.batch_size, c.max_length + 1), np.int32)
        lengths = np.ones((c.batch_size,), np.int32)
        knobs = make_knobs(options, c.max_length)
        return jax.export.export(self._run, platforms=list(platforms))(self.forward.params, tokens, lengths, knobs)

    def check_prompt(self, prompt: Sequence[int], index: int = 0) -> list[int]:
        """The prompt as a list of ints, or a `DecodeInputError` saying why it cannot be decoded."""
        ids = [int(t) for t in prompt]
        limit = self.config.max_length
        if not ids:
            raise DecodeInputError(f"prompt {index} is empty")
        if len(ids) >= limit:
            raise DecodeInputError(
                f"prompt {index} has {len(ids)} tokens; max_length {limit} counts prompt + response, "
                f"so it must be at least {len(ids) + 1}"
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise DecodeInputError(f"prompt {index} has token ids outside the vocabulary ({self.vocab_size}): {bad[:5]}")
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], options: DecodeOptions = DecodeOptions(),
                 params: Any = None) -> list[DecodeResult]:
        """Decode every prompt (token ids, chat template already applied); results in prompt order.

        ``params`` replaces the forward's parameters for this call (same structure and shapes:
        no recompilation), e.g. weights updated by training.
        """
        checked = [self.check_prompt(p, i) for i, p in enumerate(prompts)]
        knobs = make_knobs(options, self.config.max_length)
        params = self.forward.params if params is None else params
        b = self.config.batch_size
        if checked:
            self.compile(params, options)
        compile_s, self._pending_compile_s = self._pending_compile_s, 0.0
        results: list[DecodeResult] = []
        for start in range(0, len(checked), b):
            if self.on_batch is not None:
                self.on_batch(start, min(start + b, len(checked)), len(checked))
            results.extend(self._batch(checked[start : start + b], knobs, params, compile_s))
            compile_s = 0.0  # charged to the first batch only
        return results

    def _batch(self, prompts: list[list[int]], knobs: Any, params: Any, compile_s: float) -> list[DecodeResult]:
        c = self.config
        tokens = np.zeros((c.batch_size, c.max_length + 1), np.int32)
        lengths = np.zeros((c.batch_size,), np.int32)  # rows past the prompts: length 0, done from the start
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        if self.profiler is not None:
            self.profiler.reset()
        t0 = time.perf_counter()
        out: Output = jax.device_get(self._run(params, tokens, lengths, knobs))
        wall = time.perf_counter() - t0
        phase_time = dict(self.profiler.seconds) if self.profiler is not None else None
        return [self._result(out, i, p, wall, phase_time, compile_s) for i, p in enumerate(prompts)]

    def _result(self, out: Output, i: int, prompt: list[int], wall: float, phase_time: dict | None,
                compile_s: float = 0.0) -> DecodeResult:
        response = [int(t) for t in out.tokens[i, len(prompt) : int(out.n[i])]]
        if self.config.mode == "diffusion" and self.eos_id in response:  # what follows the first eos is filler
            response = response[: response.index(self.eos_id) + 1]
        calls = {kind: int(out.calls[i, k]) for k, kind in enumerate(CALL_KINDS)}
        stats = DecodeStats(
            model_calls=sum(calls.values()),
            prefill_calls=calls["prefill"],
            plan_calls=calls["plan"],
            denoise_calls=calls["denoise"],
            commit_calls=calls["commit"],
            tokens_generated=len(response),
            rounds=int(out.rounds[i]),
            groups=int(out.groups[i]),
            spans=int(out.spans[i]),
            span_lengths=self._span_lengths(response),
            finish_reason=FINISH_REASONS[int(out.finish[i])],
            wall_time_s=wall,
            batch_size=self.config.batch_size,
            loop_iterations=int(out.iterations),
            phase_time_s=phase_time,
            compile_time_s=compile_s,
        )
        return DecodeResult(prompt, response, stats)

    def _span_lengths(self, response: list[int]) -> list[int]:
        if self.config.mode != "pd":
            return []
        starts = [j for j, t in enumerate(response) if t == self.ids.async_start]
        ends = [j for j, t in enumerate(response) if t == self.ids.async_end]
        return [e - s - 1 for s, e in zip(starts, ends)]
