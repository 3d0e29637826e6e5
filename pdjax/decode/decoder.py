"""The planned-diffusion decoder: one jit-compiled `lax.while_loop` per request batch (METHOD §4).

Every example of a batch runs its own state machine, in its own phase:

- PREFILL: the prompt, causal, into the KV cache; its last logits give the
  first response token.
- PLAN: one AR step with the cache, under the plan grammar
  (`pdjax.decode.layout`), until a closer (``<sync/>`` / ``<|im_end|>``) or the
  budget.
- LAYOUT (no model call): the round's promises are parsed on device and the
  group is laid out right after the plan, its closer right after the group.
  A round without promises is plain text: its ``<|im_end|>`` ends the response.
- DENOISE: one forward over the whole group per step (all spans at once);
  each span unmasks its scheduled top-k (`pdjax.decode.schedule`).
- COMMIT: one forward over the finished group + ``<sync/>`` writes their exact
  keys/values (the group visible from the sync); the sync's logits give the
  next plan token. A group closed by ``<|im_end|>`` needs no commit.

Each loop iteration makes exactly one batched model call that serves every
unfinished example in whatever phase it is: each example contributes a window
of tokens (its prompt, its last plan token, its group, or its group + sync)
and the call's width is the smallest static bucket (`DecodeConfig.windows`)
that holds the widest window, chosen with `lax.switch`. The compiled program
therefore holds one forward per bucket, whatever the prompt lengths. Slot =
position (no left padding); the unused part of a window writes to a scratch
slot (position ``max_length``) with ``visible_from = NEVER`` and doc 0, which
no query ever sees. Finished examples take no part; denoising-only work
(sampling every window position, the per-span selection) and the layout are
skipped with `lax.cond` when no example needs them.

Modes: ``pd`` (planned diffusion), ``ar`` (causal decoding with the cache, no
plan handling: it needs only the eos id) and ``diffusion`` (Dream's diffusion:
``max_length - prompt`` masks in one bidirectional block anchored at the last
prompt token, steps = ``int(masks * steps_ratio)``, one global top-k per step;
the prompt before the anchor is cached). All three share the sampling code.

Budget: ``max_length`` counts prompt + response (``max_new_tokens`` may cap a
response further, per run). A plan that reaches the budget stops (finish
"length"); a group that does not fit is shortened (see `pdjax.decode.layout`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.decode import layout as lay
from pdjax.decode import schedule as sch
from pdjax.decode.sampling import ALGS, Sample, SamplingParams, sample
from pdjax.decode.stats import Profiler
from pdjax.structure import NEVER, ControlIds, Role, Segments

DecodeMode = Literal["pd", "ar", "diffusion"]
DECODE_MODES: tuple[str, ...] = ("pd", "ar", "diffusion")

# XLA may keep bf16 intermediates in f32 inside a fusion ("excess precision"), and fuses differently
# per shape: a row's logits would then depend on the batch it shares a call with, and a served request
# would not reproduce the CLI's greedy tokens. Rounding as written makes a row's numerics its own.
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}

PREFILL, PLAN, DENOISE, COMMIT, DONE = 0, 1, 2, 3, 4  # an example's phase; CALL_KINDS follow it
RUNNING, FINISHED_EOS, FINISHED_LENGTH = 0, 1, 2
FINISH_REASONS = {RUNNING: "running", FINISHED_EOS: "eos", FINISHED_LENGTH: "length"}
CALL_KINDS = ("prefill", "plan", "denoise", "commit")  # = phases 0..3


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


class Rows(NamedTuple):
    """Per-example decoding state, every field [B, ...]."""

    tokens: jax.Array  # [B, S] token at each position (slot S-1 is scratch)
    prompt_len: jax.Array
    limit: jax.Array  # prompt + response budget: min(max_length, prompt + max_new_tokens)
    n: jax.Array  # response end: the next free position
    phase: jax.Array
    finish: jax.Array
    round_start: jax.Array  # first position of the current plan round
    grammar: lay.Grammar
    group_start: jax.Array
    offset: jax.Array  # [B, K + 1] span boundaries relative to group_start
    count: jax.Array  # spans in the group
    size: jax.Array  # group tokens, tags included
    block_base: jax.Array  # block id of the group's first span
    next_block: jax.Array
    closer: jax.Array  # the token that ended the round (<sync/> or <|im_end|>)
    step: jax.Array  # denoising step within the group
    steps: jax.Array  # scheduled denoising steps of the group
    carry: jax.Array  # [B, K] threshold variant: budget carried over per span
    calls: jax.Array  # [B, 4] model calls per kind (CALL_KINDS)
    rounds: jax.Array
    groups: jax.Array
    spans: jax.Array


class State(NamedTuple):
    rows: Rows
    cache: Any
    iteration: jax.Array
    batch_calls: jax.Array  # [4] batched calls that served at least one example of each kind


class Window(NamedTuple):
    """One call's inputs at full width [B, max_length]; a bucket's call uses the first W columns."""

    tokens: jax.Array
    segments: Segments
    valid: jax.Array
    span: jax.Array  # span index of each window position (group windows)
    length: jax.Array  # [B] valid tokens
    ar_index: jax.Array  # [B] window index whose logits give the next AR token


class Output(NamedTuple):
    """What the host receives once per batch."""

    tokens: jax.Array
    n: jax.Array
    finish: jax.Array
    calls: jax.Array
    rounds: jax.Array
    groups: jax.Array
    spans: jax.Array
    iterations: jax.Array
    batch_calls: jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the traced program closes over."""

    config: DecodeConfig
    apply: Any
    make_cache: Any
    head: Any
    eos: int
    ids: ControlIds | None
    vocab_size: int
    profiler: Profiler | None

    @property
    def length(self) -> int:  # cache slots: positions 0..max_length-1 and the scratch slot
        return self.config.max_length + 1

    @property
    def scratch(self) -> int:
        return self.config.max_length


SAMPLE_CHUNK_BYTES = 2**28  # float32 logits of one sampling chunk: 256 MiB ([256, 152,064] for Dream's vocabulary)


def sample_chunk(config: DecodeConfig, vocab_size: int) -> int:
    """Positions sampled at once (`DecodeConfig.sample_chunk`, or automatic): a power of two whose float32
    logits fit `SAMPLE_CHUNK_BYTES`, and no more than a call can hold (batch x max_length)."""
    if config.sample_chunk:
        return config.sample_chunk
    fits = max(1, SAMPLE_CHUNK_BYTES // (4 * vocab_size))
    return min(1 << (fits.bit_length() - 1), 1 << (config.batch_size * config.max_length - 1).bit_length())


def chunk_sizes(chunk: int, platform: str) -> tuple[int, ...]:
    """The sampling chunk sizes the loop of `_Program._draw` may take on `platform`: one on a TPU, where each is
    minutes of compile; elsewhere also a quarter and a sixteenth, for calls with few masked positions."""
    if platform == "tpu":
        return (chunk,)
    return tuple(sorted({max(1, chunk // 16), max(1, chunk // 4), chunk}))


def _select_rows(mask: jax.Array, new: Any, old: Any) -> Any:
    """Rows of `new` where mask [B], rows of `old` elsewhere (any pytree of [B, ...] arrays)."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def _gather(tokens: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(tokens, jnp.clip(index, 0, tokens.shape[1] - 1), axis=1)


def _bucket_index(windows: tuple[int, ...], need: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.sum(jnp.asarray(windows) < need), len(windows) - 1)


def _cond(pred: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """fn(operand) if pred else operand: skips work that no example needs."""
    return jax.lax.cond(pred, fn, lambda x: x, operand)


def _run_if(pred: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """`_cond` as a while loop of at most one iteration, for operands updated in place (the KV cache).

    XLA copies an operand that a conditional's branch updates, and here it did so inside the layer
    loop (the TPU compiler: twice per layer, the whole cache each time, and one more cache's worth of
    memory); a loop-carried buffer it updates in place.
    """
    return jax.lax.while_loop(lambda c: c[0], lambda c: (jnp.bool_(False), fn(c[1])), (pred, operand))[1]


def _switch_in_place(index: jax.Array, branches: Sequence[Callable[[Any], Any]], operand: Any) -> Any:
    """`lax.switch(index, branches, operand)` as a chain of `_run_if`: the chosen branch runs, the others pass."""
    for k, branch in enumerate(branches):
        operand = _run_if(index == k, branch, operand)
    return operand


class _Program:
    """The traced decoding program of one `_Static` (traced once per compiled shape)."""

    def __init__(self, static: _Static):
        self.s = static
        c = static.config
        self.k = c.max_spans
        self.width = c.max_length
        ids = static.ids
        if c.mode != "ar":
            v = static.vocab_size
            self.digit_value = jnp.asarray(lay.digit_values(ids, v)) if c.mode == "pd" else None
            banned = set(ids.control_set) - ({ids.pad} if c.mode == "pd" else {ids.eos})
            bias = np.zeros(v, np.float32)
            bias[sorted(banned)] = -np.inf
            self.span_bias = jnp.asarray(bias)  # what a span (or the diffusion answer) may not contain
        self.sample_chunk = sample_chunk(c, static.vocab_size)

    # ---- the window of each example's call -----------------------------------------------

    def _window(self, rows: Rows, knobs: Knobs) -> Window:
        """Tokens and segment ids of every example's part of this iteration's call."""
        c = self.s.config
        phase = rows.phase[:, None]
        rel = jnp.arange(self.width, dtype=jnp.int32)[None, :]
        prefill_len = rows.prompt_len - (1 if c.mode == "diffusion" else 0)
        group_end = rows.group_start + rows.size  # the closer's position
        start = jnp.select(
            [rows.phase == PREFILL, rows.phase == PLAN], [jnp.zeros_like(rows.n), rows.n - 1], rows.group_start
        )
        length = jnp.select(
            [rows.phase == PREFILL, rows.phase == PLAN, rows.phase == DENOISE, rows.phase == COMMIT],
            [prefill_len, jnp.ones_like(rows.n), rows.size, rows.size + 1],
            0,
        )
        pos = start[:, None] + rel
        valid = rel < length[:, None]
        span = jnp.clip(jax.vmap(lay.span_of, in_axes=(0, 0, None))(rows.offset, rows.count, rel[0]), 0, self.k - 1)
        sparse = (not c.mode == "diffusion") & ~knobs.dense[:, None]
        group_block = rows.block_base[:, None] + jnp.where(sparse, span, 0)
        is_sync = (phase == COMMIT) & (rel == rows.size[:, None])
        in_group = ((phase == DENOISE) | (phase == COMMIT)) & ~is_sync
        span_start = jnp.take_along_axis(rows.offset, span, axis=1)
        span_end = jnp.take_along_axis(rows.offset, span + 1, axis=1)
        is_tag = (c.mode == "pd") & ((rel == span_start) | (rel == span_end - 1))
        role = jnp.where(
            in_group,
            jnp.where(is_tag, int(Role.TAG), int(Role.SPAN)),
            jnp.where(phase == PREFILL, int(Role.PROMPT), int(Role.PLAN)),
        )
        visible = jnp.where(phase == DENOISE, NEVER, jnp.where(phase == COMMIT, group_end[:, None], pos))
        segments = Segments(
            block_id=jnp.where(valid & in_group, group_block, 0).astype(jnp.int32),
            visible_from=jnp.where(valid, visible, NEVER).astype(jnp.int32),
            position=jnp.where(valid, pos, self.s.scratch).astype(jnp.int32),
            doc_id=valid.astype(jnp.int32),
            role=jnp.where(valid, role, int(Role.PADDING)).astype(jnp.int32),
        )
        tokens = jnp.where(valid, _gather(rows.tokens, pos), 0)
        ar_index = jnp.select([rows.phase == PREFILL, rows.phase == COMMIT], [prefill_len - 1, rows.size], 0)
        return Window(tokens, segments, valid, span, length, jnp.maximum(ar_index, 0))

    def _call(self, params: Any, window: Window, cache: Any, *, width: int) -> tuple[Any, jax.Array]:
        """The model on the first `width` window columns: the new cache and hidden states [B, max_length, D]
        (zero past the call's width). No logits: `_ar_logits` and `_draw` apply the head where they sample.

        A batch of one calls with at least two columns (the second one scratch): a one-token call
        of one row would make every matmul a matrix-vector product, which XLA sums in another order
        than a matrix product, so a request's greedy tokens would depend on the batch it is in
        (batch size 1 here, a serving engine's shared calls elsewhere).
        """
        width = max(width, 2 if window.tokens.shape[0] == 1 else 1)
        cut = lambda a: a[:, :width]  # noqa: E731
        hidden, cache = self.s.apply(params, cut(window.tokens), jax.tree.map(cut, window.segments), cache)
        return cache, jnp.pad(hidden, ((0, 0), (0, self.width - width), (0, 0)))

    def _ar_logits(self, params: Any, hidden: jax.Array, window: Window) -> jax.Array:
        """Each row's AR logits [B, V]: the head on the hidden state at its `ar_index` (at least two rows per
        matmul, for the reason `_call` gives)."""
        b = hidden.shape[0]
        index = jnp.clip(window.ar_index, 0, self.width - 1)
        at = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
        rows = jnp.arange(b, dtype=jnp.int32)
        position = jnp.take_along_axis(window.segments.position, index[:, None], axis=1)[:, 0]
        if b == 1:
            at, rows, position = (jnp.concatenate([x, x]) for x in (at, rows, position))
        return self.s.head(params, at, rows, position)[:b]

    def _draw(self, params: Any, hidden: jax.Array, window: Window, keys: jax.Array,
              sampling: SamplingParams) -> Sample:
        """A sample [B, max_length] at every masked window position (zeros elsewhere), from the logits of the
        position before it (Dream reads the prediction for j at j-1; a window's first token is never a mask).

        The masked positions of all rows are taken `chunk` at a time (a while loop): only one chunk's
        [chunk, V] logits and sampling temporaries exist at once, whatever the window and batch. Each
        position samples with its own key, so the chunking changes no token. On a TPU every chunk has
        one size (each size is another copy of the sampling code, minutes of TPU compile); elsewhere
        the last chunk shrinks to a quarter or a sixteenth when that holds what is left.
        """
        b, w = window.tokens.shape
        n = b * w
        masked = (window.valid & (window.tokens == self.s.ids.mask)).reshape(-1)
        count = jnp.sum(masked, dtype=jnp.int32)
        order = jnp.pad(jnp.argsort(~masked, stable=True).astype(jnp.int32), (0, self.sample_chunk))  # masked first
        position = window.segments.position

        def chunk(size: int, start: jax.Array, out: Sample) -> tuple[jax.Array, Sample]:
            at = jax.lax.dynamic_slice_in_dim(order, start, size)
            live = start + jnp.arange(size) < count
            row, col = at // w, at % w
            prev = jnp.maximum(col - 1, 0)
            logits = self.s.head(params, hidden[row, prev], row, position[row, prev]) + self.span_bias
            item_keys = jax.vmap(jax.random.fold_in)(keys[row], position[row, col])
            drawn = sample(item_keys, logits, jax.tree.map(lambda k: k[row], sampling), live)
            target = jnp.where(live, at, n)  # past the end: dropped
            return start + size, jax.tree.map(lambda o, v: o.at[target].set(v, mode="drop"), out, drawn)

        def loop(sizes: tuple[int, ...], out: Sample) -> Sample:
            def body(carry: tuple[jax.Array, Sample]) -> tuple[jax.Array, Sample]:
                start, out = carry
                if len(sizes) == 1:
                    return chunk(sizes[0], start, out)
                branches = [functools.partial(chunk, size) for size in sizes]
                return jax.lax.switch(_bucket_index(sizes, count - start), branches, start, out)

            return jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), out))[1]

        zeros = jnp.zeros((n,), jnp.float32)
        out = Sample(zeros.astype(jnp.int32), zeros, zeros)
        out = jax.lax.platform_dependent(
            out, tpu=functools.partial(loop, chunk_sizes(self.sample_chunk, "tpu")),
            default=functools.partial(loop, chunk_sizes(self.sample_chunk, "cpu")),
        )
        return jax.tree.map(lambda a: a.reshape(b, w), out)

    # ---- AR tokens: plan steps, the token after a prefill or a commit -----------------------

    def _ar_sample(self, logits: jax.Array, rows: Rows, knobs: Knobs, needed: jax.Array) -> jax.Array:
        """Each example's next AR token from logits [B, V] (under the plan grammar in pd mode); only the
        `needed` [B] rows' tokens are read."""
        if self.s.config.mode == "pd":
            bias = jax.vmap(lambda g: lay.grammar_bias(g, self.s.ids, logits.shape[-1], self.k))(rows.grammar)
            logits = logits + bias
        return sample(self._row_keys(rows, knobs), logits, knobs.sampling, needed).token

    def _row_keys(self, rows: Rows, knobs: Knobs) -> jax.Array:
        """[B] keys: one per example and per model call of that example (independent of the batch).

        An example's key comes from its own seed and its own call count, so its randomness
        depends neither on the other rows nor on where a serving engine cut the loop into chunks.
        """
        return jax.vmap(jax.random.fold_in)(knobs.key, jnp.sum(rows.calls, axis=1))

    def _write(self, row: Rows, token: jax.Array) -> Rows:
        """One example appends an ordinary AR token at row.n."""
        c, pos = self.s.config, row.n
        is_eos = token == self.s.eos
        full = pos + 1 >= row.limit
        row = row._replace(
            tokens=row.tokens.at[pos].set(token),
            n=pos + 1,
            phase=jnp.where(is_eos | full, DONE, PLAN),
            finish=jnp.where(is_eos, FINISHED_EOS, jnp.where(full, FINISHED_LENGTH, RUNNING)),
        )
        if c.mode == "pd":
            row = row._replace(
                grammar=lay.grammar_step(row.grammar, token, self.s.ids, self.digit_value),
                rounds=row.rounds + full.astype(jnp.int32),  # the budget ends this round
            )
        return row

    def _accept(self, rows: Rows, token: jax.Array, knobs: Knobs) -> Rows:
        """Every example appends its AR token; in pd mode a closer ends the round and lays out its group."""
        written = jax.vmap(self._write)(rows, token)
        if self.s.config.mode != "pd":
            return written
        ids = self.s.ids
        closing = (token == ids.sync) | (token == ids.eos)
        laid = _cond(jnp.any(closing), lambda r: jax.vmap(self._layout)(r, token, knobs), rows)
        return _select_rows(closing, laid, written)

    def _layout(self, row: Rows, closer: jax.Array, knobs: Knobs) -> Rows:
        """The round ended with `closer` at row.n: parse its promises and lay out the group."""
        ids = self.s.ids
        q = row.n
        numbers, count = lay.parse_promises(row.tokens, row.round_start, q, ids, self.digit_value, self.k)
        group = lay.plan_group(knobs.lengths[numbers], count, q, row.limit)
        rounds = row.rounds + 1
        # a round without promises is plain text: its closer (<|im_end|> under the grammar) ends the response
        plain = row._replace(
            tokens=row.tokens.at[q].set(closer), n=q + 1, phase=DONE,
            finish=jnp.where(closer == ids.eos, FINISHED_EOS, FINISHED_LENGTH), rounds=rounds,
        )
        truncated = row._replace(phase=DONE, finish=FINISHED_LENGTH, rounds=rounds)
        laid = row._replace(
            tokens=lay.write_group(row.tokens, q, group, ids).at[q + group.size].set(closer),
            n=q + group.size + 1,
            group_start=q,
            offset=group.offset,
            count=group.count,
            size=group.size,
            block_base=row.next_block,
            next_block=row.next_block + jnp.where(knobs.dense, 1, count),
            closer=closer,
            step=jnp.int32(0),
            steps=knobs.steps[jnp.max(group.length)],
            carry=jnp.zeros_like(row.carry),
            rounds=rounds,
            groups=row.groups + 1,
            spans=row.spans + count,
        )
        laid = self._after_step(laid, jnp.sum(group.length) > 0)
        out = jax.tree.map(lambda a, b: jnp.where(group.fits, a, b), laid, truncated)
        return jax.tree.map(lambda a, b: jnp.where(count == 0, a, b), plain, out)

    def _after_step(self, row: Rows, masks_left: jax.Array) -> Rows:
        """Phase after a denoising step (or a layout): denoise on, commit, or done."""
        c = self.s.config
        if c.mode == "diffusion":
            pos = jnp.arange(row.tokens.shape[0])
            answer = (pos >= row.prompt_len) & (pos < row.limit)
            finish = jnp.where(jnp.any(answer & (row.tokens == self.s.eos)), FINISHED_EOS, FINISHED_LENGTH)
            phase = DONE
        else:
            is_sync = row.closer == self.s.ids.sync
            room = row.group_start + row.size + 1 < row.limit  # a next plan token fits after the sync
            phase = jnp.where(is_sync & room, COMMIT, DONE)
            finish = jnp.where(is_sync, jnp.where(room, RUNNING, FINISHED_LENGTH), FINISHED_EOS)
        return row._replace(
            phase=jnp.where(masks_left, DENOISE, phase), finish=jnp.where(masks_left, RUNNING, finish)
        )

    def _layout_diffusion(self, row: Rows, knobs: Knobs) -> Rows:
        """Dream diffusion: masks from the prompt end to the row's limit, one block with the anchor."""
        p = row.prompt_len
        masks = row.limit - p
        pos = jnp.arange(row.tokens.shape[0])
        offset = jnp.full((self.k + 1,), masks + 1, jnp.int32).at[0].set(0)
        return row._replace(
            tokens=jnp.where((pos >= p) & (pos < row.limit), self.s.ids.mask, row.tokens),
            n=row.limit, group_start=p - 1, offset=offset, count=jnp.int32(1), size=masks + 1,
            block_base=jnp.int32(1), next_block=jnp.int32(2), step=jnp.int32(0), steps=knobs.steps[masks],
            phase=jnp.int32(DENOISE), finish=jnp.int32(RUNNING), groups=jnp.int32(1),
        )

    # ---- denoising --------------------------------------------------------------------

    def _denoise(self, rows: Rows, window: Window, drawn: Sample, knobs: Knobs) -> Rows:
        """Each denoising example unmasks, per span, its scheduled top-k (or the threshold variant's picks)."""
        masked = window.valid & (window.tokens == self.s.ids.mask)
        per_span = jax.vmap(lambda m, sp: jax.ops.segment_sum(m.astype(jnp.int32), sp, num_segments=self.k))(
            masked, window.span
        )
        use_threshold = (knobs.threshold >= 0)[:, None]
        confidence = jnp.where(use_threshold, drawn.prob, drawn.confidence)
        rank = jax.vmap(sch.rank_within_spans)(confidence, window.span, masked)
        counts = sch.unmask_counts(per_span, rows.step, rows.steps)
        scheduled = jax.vmap(sch.select_scheduled)(rank, window.span, counts)
        budget = sch.threshold_budget(per_span, rows.carry, rows.step, rows.steps)
        gated, carry = jax.vmap(sch.select_threshold)(rank, window.span, budget, drawn.prob, knobs.threshold)
        take = masked & jnp.where(use_threshold, gated, scheduled)
        index = jnp.where(take, window.segments.position, self.s.scratch)
        tokens = rows.tokens.at[jnp.arange(rows.tokens.shape[0])[:, None], index].set(drawn.token)
        rows = rows._replace(tokens=tokens, step=rows.step + 1, carry=jnp.where(use_threshold, carry, rows.carry))
        return jax.vmap(self._after_step)(rows, jnp.any(masked & ~take, axis=1))

    # ---- one iteration -----------------------------------------------------------------

    def _mark(self, state: State, kinds: jax.Array) -> State:
        """Profiling only: a host timestamp once this call's results exist (data-dependent, ordered)."""
        if self.s.profiler is None:
            return state
        from jax.experimental import io_callback

        n = io_callback(
            self.s.profiler.mark, jax.ShapeDtypeStruct(state.rows.n.shape, jnp.int32), kinds, state.rows.n,
            ordered=True,
        )
        return state._replace(rows=state.rows._replace(n=n))

    def step(self, state: State, params: Any, knobs: Knobs) -> State:
        """One batched model call serving every unfinished example, then each example's transition."""
        c = self.s.config
        rows = state.rows
        phase = rows.phase
        window = self._window(rows, knobs)
        denoising = jnp.any(phase == DENOISE)
        windows = c.windows
        branches = [lambda out, w=w: self._call(params, window, out[0], width=w) for w in windows]
        need = jnp.max(jnp.where(phase != DONE, window.length, 0))
        shape = jax.eval_shape(lambda: self._call(params, window, state.cache, width=windows[0]))[1]
        hidden = jnp.zeros(shape.shape, shape.dtype)
        cache, hidden = _switch_in_place(_bucket_index(windows, need), branches, (state.cache, hidden))
        row_keys = self._row_keys(rows, knobs)
        served = (phase != DONE) & (window.length > 0)
        kinds = jax.nn.one_hot(phase, 4, dtype=jnp.int32) * served[:, None]
        rows = rows._replace(calls=rows.calls + kinds)
        state = state._replace(
            cache=cache, iteration=state.iteration + 1, batch_calls=state.batch_calls + (jnp.sum(kinds, 0) > 0)
        )

        # AR rows: the prompt's next token (pd, ar), a plan step, the token after a commit's <sync/>
        ar_rows = (phase == PLAN) | (phase == COMMIT) | ((phase == PREFILL) & (c.mode != "diffusion"))
        if c.mode == "pd":
            next_round = rows._replace(
                round_start=rows.group_start + rows.size + 1,
                grammar=jax.tree.map(lambda x: jnp.broadcast_to(x, phase.shape), lay.Grammar.fresh()),
            )
            rows = _select_rows(phase == COMMIT, next_round, rows)
        new = rows
        if c.mode != "diffusion":
            def ar_step(rows: Rows) -> Rows:
                token = self._ar_sample(self._ar_logits(params, hidden, window), rows, knobs, ar_rows)
                return _select_rows(ar_rows, self._accept(rows, token, knobs), rows)

            # a call that takes no AR step (a denoising round) skips the AR head, sampling and layout
            new = _cond(jnp.any(ar_rows), ar_step, rows)
        if c.mode != "ar":
            def denoise(rows: Rows) -> Rows:
                drawn = self._draw(params, hidden, window, row_keys, knobs.sampling)
                return self._denoise(rows, window, drawn, knobs)

            new = _select_rows(phase == DENOISE, _cond(denoising, denoise, rows), new)
        if c.mode == "diffusion":
            laid = jax.vmap(self._layout_diffusion)(rows, knobs)
            new = _select_rows(phase == PREFILL, laid, new)
        return self._mark(state._replace(rows=new), jnp.sum(kinds, 0) > 0)

    # ---- a batch: fresh rows, bounded chunks of iterations, the whole loop ----------------

    def fresh_rows(self, prompt_tokens: jax.Array, prompt_len: jax.Array, max_new: jax.Array) -> Rows:
        """Rows about to prefill prompt_tokens [B, max_length + 1] (prompt first); prompt_len 0 is an empty row.

        max_new [B] is each row's response budget (`Knobs.max_new`)."""
        c = self.s.config
        b, k = prompt_len.shape[0], self.k
        zeros = jnp.zeros((b,), jnp.int32)
        return Rows(
            tokens=prompt_tokens, prompt_len=prompt_len, limit=jnp.minimum(c.max_length, prompt_len + max_new),
            n=prompt_len,
            phase=jnp.where(prompt_len > 0, PREFILL, DONE).astype(jnp.int32), finish=zeros, round_start=prompt_len,
            grammar=jax.tree.map(lambda x: jnp.broadcast_to(x, (b,)), lay.Grammar.fresh()),
            group_start=zeros, offset=jnp.zeros((b, k + 1), jnp.int32), count=zeros, size=zeros,
            block_base=jnp.ones((b,), jnp.int32), next_block=jnp.ones((b,), jnp.int32), closer=zeros,
            step=zeros, steps=zeros, carry=jnp.zeros((b, k), jnp.int32), calls=jnp.zeros((b, 4), jnp.int32),
            rounds=zeros, groups=zeros, spans=zeros,
        )

    def init(self, prompt_tokens: jax.Array, prompt_len: jax.Array, max_new: jax.Array) -> State:
        """The loop state before the first iteration: fresh rows and an empty KV cache."""
        s = self.s
        rows = self.fresh_rows(prompt_tokens, prompt_len, max_new)
        state = State(rows, s.make_cache(s.config.batch_size, s.length), jnp.int32(0), jnp.zeros((4,), jnp.int32))
        return self._mark(state, jnp.zeros((4,), bool))

    def split_step(self, state: State, params: Any, knobs: Knobs) -> State:
        """`step` with every row's call at its own width: wide rows alone, the plan steps of all rows together.

        Rows that prefill, denoise or commit each make a batch-1 call at their own bucket (the
        `Decoder`'s call for a lone request); the rows that take a plan step then share one
        width-1 call. One `step` pads every row to the widest window, which on a compute-bound
        device costs more than the shared call saves. Each row still advances exactly one step.
        """
        rows = state.rows
        b = rows.phase.shape[0]
        axes = _cache_batch_axes(self.s.make_cache, self.s.length)
        wide = (rows.phase != DONE) & (rows.phase != PLAN)

        def take(tree: Any, i: jax.Array, tree_axes: Any = None) -> Any:
            if tree_axes is None:
                return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, 0), tree)
            return jax.tree.map(lambda x, a: x if a is None else jax.lax.dynamic_slice_in_dim(x, i, 1, a),
                                tree, tree_axes)

        def put(tree: Any, part: Any, i: jax.Array, tree_axes: Any = None) -> Any:
            if tree_axes is None:
                return jax.tree.map(lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, i, 0), tree, part)
            return jax.tree.map(lambda x, y, a: y if a is None else jax.lax.dynamic_update_slice_in_dim(x, y, i, a),
                                tree, part, tree_axes)

        def alone(i: jax.Array, st: State) -> State:
            def one(st: State) -> State:
                sub = State(take(st.rows, i), take(st.cache, i, axes), st.iteration, st.batch_calls)
                sub = self.step(sub, params, take(knobs, i))
                return st._replace(rows=put(st.rows, sub.rows, i), cache=put(st.cache, sub.cache, i, axes),
                                   batch_calls=sub.batch_calls)

            return jax.lax.cond(wide[i], one, lambda s: s, st)

        state = jax.lax.fori_loop(0, b, alone, state)
        stepped = state.rows
        narrow = state._replace(rows=rows._replace(phase=jnp.where(wide, DONE, rows.phase)))
        narrow = _cond(jnp.any(rows.phase == PLAN), lambda st: self.step(st, params, knobs), narrow)
        return narrow._replace(rows=_select_rows(wide, stepped, narrow.rows), iteration=state.iteration + 1)

    def chunk(self, state: State, params: Any, knobs: Knobs, iterations: jax.Array | int,
              until_finish: jax.Array | bool = False, split: bool = False) -> State:
        """At most `iterations` loop iterations; fewer once every example is done, or (`until_finish`)
        as soon as one more example is done, so that a host can refill its row."""
        done_before = jnp.sum(state.rows.phase == DONE)

        def more(carry: tuple[State, jax.Array]) -> jax.Array:
            st, i = carry
            done = jnp.sum(st.rows.phase == DONE)
            return (done < st.rows.phase.shape[0]) & (i < iterations) & ~(until_finish & (done > done_before))

        step = self.split_step if split else self.step
        state, _ = jax.lax.while_loop(more, lambda c: (step(c[0], params, knobs), c[1] + 1), (state, jnp.int32(0)))
        return state

    def run(self, params: Any, prompt_tokens: jax.Array, prompt_len: jax.Array, knobs: Knobs) -> Output:
        """Decode a batch: prompt_tokens [B, max_length + 1] (prompt first), prompt_len [B] (0: an empty row)."""
        c = self.s.config
        knobs = per_row(knobs, c.batch_size)
        state = self.init(prompt_tokens, prompt_len, knobs.max_new)
        # every iteration moves each unfinished example on by a token or a mask: the cap is never reached
        state = self.chunk(state, params, knobs, 2 * c.max_length + 8)
        r = state.rows
        return Output(r.tokens, r.n, r.finish, r.calls, r.rounds, r.groups, r.spans, state.iteration, state.batch_calls)

    # ---- serving: refill finished rows between chunks -------------------------------------

    def refill(self, state: State, admit: jax.Array, prompt_tokens: jax.Array, prompt_len: jax.Array,
               knobs: Knobs) -> State:
        """Rows where admit [B] start afresh on their new prompt (length 0 empties the row); their cache rows
        are cleared, since a stale entry of the same block id would otherwise be visible to the new request."""
        rows = _select_rows(admit, self.fresh_rows(prompt_tokens, prompt_len, knobs.max_new), state.rows)
        return state._replace(rows=rows, cache=_run_if(jnp.any(admit), lambda c: self._clear_cache(c, admit), state.cache))

    def _clear_cache(self, cache: Any, admit: jax.Array) -> Any:
        s = self.s
        empty = s.make_cache(s.config.batch_size, s.length)

        def pick(new: jax.Array, old: jax.Array, axis: int | None) -> jax.Array:
            if axis is None:
                return old
            shape = [1] * old.ndim
            shape[axis] = admit.shape[0]
            return jnp.where(admit.reshape(shape), new, old)

        return jax.tree.map(pick, empty, cache, _cache_batch_axes(s.make_cache, s.length))

    def serve(self, state: State, params: Any, admit: jax.Array, prompt_tokens: jax.Array, prompt_len: jax.Array,
              knobs: Knobs, iterations: jax.Array, until_finish: jax.Array,
              split: bool = False) -> tuple[State, "SlotView"]:
        """One device call of a serving engine: refill the admitted rows, run a chunk, and return what the host reads.

        ``split`` iterates with `split_step` (the `split` schedule); otherwise every iteration is one
        `step` over all rows (the `shared` schedule)."""
        state = self.chunk(self.refill(state, admit, prompt_tokens, prompt_len, knobs), params, knobs, iterations,
                           until_finish, split=split)
        r = state.rows
        # what is final: everything written, except a group still being denoised (its masks)
        final = jnp.where(r.phase == DENOISE, jnp.maximum(r.group_start, r.prompt_len), r.n)
        view = SlotView(r.tokens, r.n, final, r.phase == DONE, r.finish, r.calls, r.rounds, r.groups, r.spans,
                        state.iteration)
        return state, view


def _cache_batch_axes(make_cache: Any, length: int) -> Any:
    """For each cache leaf, the axis that grows with the batch (None: a leaf shared by all rows)."""
    two, three = (jax.eval_shape(lambda b=b: make_cache(b, length)) for b in (2, 3))

    def axis(a: Any, b: Any) -> int | None:
        differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        return differ[0] if differ else None

    return jax.tree.map(axis, two, three)


class SlotView(NamedTuple):
    """What a serving host reads after each chunk, every field [B, ...] (the KV cache stays on device)."""

    tokens: jax.Array
    n: jax.Array  # written tokens (prompt included)
    final: jax.Array  # tokens[:final] will not change any more
    done: jax.Array
    finish: jax.Array
    calls: jax.Array
    rounds: jax.Array
    groups: jax.Array
    spans: jax.Array
    iteration: jax.Array  # loop iterations since the slots were created (all rows)


def _param_devices(params: Any) -> set:
    """The devices the parameters live on (abstract ones by their sharding; empty for leaves that have neither)."""
    found = set()
    for leaf in jax.tree.leaves(params):
        if hasattr(leaf, "devices"):
            found |= set(leaf.devices())
        elif getattr(leaf, "sharding", None) is not None:
            found |= set(leaf.sharding.device_set)
    return found


def _platform(params: Any) -> str:
    """The platform ("cpu", "tpu", "gpu") the parameters live on (JAX's default backend if none says)."""
    devices = _param_devices(params)
    return next(iter(devices)).platform if devices else jax.default_backend()


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


SCHEDULES = ("auto", "split", "shared")


def resolve_schedule(schedule: str, platform: str) -> str:
    """`auto` is `split` on a CPU and `shared` on an accelerator; `split` and `shared` stay as they are.

    On a CPU a wide call (prefill, denoising round, commit) is compute-bound even for one row, so
    padding other rows to its width costs more than sharing the call saves (docs/serve_throughput.md);
    on a TPU or GPU a call of a few rows costs about what one row's call costs (launch and weight reads),
    so one call per iteration over every row is what batching buys.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "auto":
        return "split" if platform == "cpu" else "shared"
    return schedule


class Slots:
    """The decoder as B fixed slots, refilled by the host between bounded chunks of loop iterations.

    This is continuous batching (JetStream's decode slots): a request does not wait for
    the batch to finish. Each `advance` is one device call and one host sync: rows the
    host admits start their prefill inside that call's chunk, and the chunk runs at
    most `iterations` iterations. How an iteration serves the rows is the ``schedule``
    (`resolve_schedule`): ``shared`` makes one call over every row at the widest row's
    window (the `Decoder`'s iteration); ``split`` (`_Program.split_step`) lets a row that
    prefills, denoises or commits make its own batch-1 call at its own width (sampling
    only its masked positions) while the plan steps of all rows share one width-1 call,
    so no row is padded to a neighbour's window. One compiled program serves every prompt length,
    knob value and chunk length (`compiled_programs` counts them). A row's answer is
    the `Decoder`'s for the same prompt and options under either schedule: its randomness
    comes from its own seed and call count, never from its neighbours or the chunking.
    """

    def __init__(self, forward: Any, *, eos_id: int, ids: ControlIds | None, config: DecodeConfig, vocab_size: int,
                 schedule: str = "auto"):
        self.config = config
        self.forward = forward
        self.schedule = resolve_schedule(schedule, _platform(forward.params))
        static = _Static(config, forward.apply, forward.make_cache, forward.head, int(eos_id), ids, int(vocab_size),
                         None)
        self._program = _Program(static)
        self._serve = jax.jit(self._serve_raw, donate_argnums=(0,), compiler_options=COMPILER_OPTIONS)
        b = config.batch_size
        self._empty = jax.jit(lambda: self._program.init(jnp.zeros((b, config.max_length + 1), jnp.int32),
                                                         jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32)))

    def _serve_raw(self, state: State, params: Any, admit: jax.Array, prompt_tokens: jax.Array,
                   prompt_len: jax.Array, knobs: Knobs, iterations: jax.Array, until_finish: jax.Array):
        knobs = knobs._replace(key=jax.random.wrap_key_data(knobs.key))
        split = self.schedule == "split" and self.config.batch_size > 1
        return self._program.serve(state, params, admit, prompt_tokens, prompt_len, knobs, iterations, until_finish,
                                   split=split)

    def empty(self) -> State:
        """Slots with no request (every row done) and an empty KV cache.

        Committed to the parameters' device: `advance` returns committed arrays, and an uncommitted
        first state would compile the program a second time.
        """
        state = self._empty()
        devices = _param_devices(self.forward.params)
        return jax.device_put(state, devices.pop()) if len(devices) == 1 else state

    def advance(self, state: State, admit: np.ndarray, prompt_tokens: np.ndarray, prompt_len: np.ndarray,
                knobs: Knobs, iterations: int, until_finish: bool = False, params: Any = None) -> tuple[State, SlotView]:
        """Admit rows (admit [B] bool; prompt_tokens [B, max_length + 1], prompt_len [B]; length 0 empties a
        row), run at most `iterations` iterations, and return the new state (the old one is donated) and the
        host view of the rows (`SlotView`, on the host)."""
        params = self.forward.params if params is None else params
        state, view = self._serve(state, params, np.asarray(admit, bool), np.asarray(prompt_tokens, np.int32),
                                  np.asarray(prompt_len, np.int32), knobs, np.int32(iterations), np.bool_(until_finish))
        return state, jax.device_get(view)

    def lower(self, sharding: Any, iterations: int = 16) -> Any:
        """The serving program (refill + chunk) lowered for the parameters' placement with abstract inputs placed by
        ``sharding`` (a `jax.stages.Lowered`; `pdjax.aot` compiles it for a TPU chip on any machine)."""
        c = self.config
        b = c.batch_size
        knobs = stack_knobs([host_knobs(DecodeOptions(), c.max_length)] * b)
        args = (jax.eval_shape(self._empty), np.ones(b, bool), np.zeros((b, c.max_length + 1), np.int32),
                np.ones(b, np.int32), knobs, np.int32(iterations), np.bool_(False))
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), args)
        state, rest = args[0], args[1:]
        return self._serve.lower(state, self.forward.params, *rest)

    def export(self, platforms: Sequence[str] = ("tpu",), iterations: int = 4) -> Any:
        """The serving program (refill + chunk) lowered for `platforms` (a `jax.export.Exported`), e.g. to check
        that the schedule lowers for TPU."""
        c = self.config
        b = c.batch_size
        knobs = stack_knobs([host_knobs(DecodeOptions(), c.max_length)] * b)
        return jax.export.export(self._serve, platforms=list(platforms))(
            self._empty(), self.forward.params, np.ones(b, bool), np.zeros((b, c.max_length + 1), np.int32),
            np.ones(b, np.int32), knobs, np.int32(iterations), np.bool_(False))

    def compiled_programs(self) -> int:
        """Programs compiled for `advance` so far (one; requests, knobs and chunk lengths never add any)."""
        return int(self._serve._cache_size())
