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
that holds the widest window (`_switch_in_place`). The compiled program
therefore holds one forward per bucket, whatever the prompt lengths. Slot =
position (no left padding); the unused part of a window writes to a scratch
slot (position ``max_length``) with ``visible_from = NEVER`` and doc 0, which
no query ever sees. Logits exist only where a token is sampled: each AR row's
one position, and a window's masked positions a chunk at a time (`_draw`).
Finished examples take no part; denoising-only work and the layout are
skipped with `lax.cond` when no example needs them. Serving (slots refilled
between chunks of the loop) is `pdjax.decode.slots`.

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
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.decode import layout as lay
from pdjax.decode import schedule as sch
from pdjax.decode.knobs import (  # noqa: F401 (the decoder's public names; they live in knobs.py)
    DECODE_MODES,
    SAMPLE_CHUNK_BYTES,
    DecodeConfig,
    DecodeMode,
    DecodeOptions,
    Knobs,
    host_knobs,
    make_knobs,
    per_row,
    sample_chunk,
    stack_knobs,
)
from pdjax.decode.sampling import Sample, SamplingParams, sample
from pdjax.decode.stats import Profiler
from pdjax.structure import NEVER, ControlIds, Role, Segments

# XLA may keep bf16 intermediates in f32 inside a fusion ("excess precision"), and fuses differently
# per shape: a row's logits would then depend on the batch it shares a call with, and a served request
# would not reproduce the CLI's greedy tokens. Rounding as written makes a row's numerics its own.
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}

PREFILL, PLAN, DENOISE, COMMIT, DONE = 0, 1, 2, 3, 4  # an example's phase; CALL_KINDS follow it
RUNNING, FINISHED_EOS, FINISHED_LENGTH = 0, 1, 2
FINISH_REASONS = {RUNNING: "running", FINISHED_EOS: "eos", FINISHED_LENGTH: "length"}
CALL_KINDS = ("prefill", "plan", "denoise", "commit")  # = phases 0..3


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

    def chunk(self, state: State, params: Any, knobs: Knobs, iterations: jax.Array | int,
              until_finish: jax.Array | bool = False, step: Callable[..., State] | None = None) -> State:
        """At most `iterations` loop iterations (each a `step`, default `self.step`); fewer once every example
        is done, or (`until_finish`) as soon as one more example is done, so that a host can refill its row."""
        done_before = jnp.sum(state.rows.phase == DONE)

        def more(carry: tuple[State, jax.Array]) -> jax.Array:
            st, i = carry
            done = jnp.sum(st.rows.phase == DONE)
            return (done < st.rows.phase.shape[0]) & (i < iterations) & ~(until_finish & (done > done_before))

        step = self.step if step is None else step
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
