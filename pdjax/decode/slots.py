"""Continuous batching: the decoder as B fixed slots that a host refills between bounded chunks of the loop.

JetStream's decode slots: a request does not wait for the batch to finish. `ServingProgram` adds to the
decoder's traced program what serving needs (refilling rows, a chunk of iterations per device call, the
`split` iteration), and `Slots` compiles it once for every prompt length, knob value and chunk length.
How one loop iteration serves the slots is the schedule (`resolve_schedule`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pdjax.decode.decoder import (
    COMPILER_OPTIONS,
    DENOISE,
    DONE,
    PLAN,
    State,
    _cond,
    _Program,
    _run_if,
    _select_rows,
    _Static,
)
from pdjax.decode.knobs import DecodeConfig, DecodeOptions, Knobs, host_knobs, stack_knobs
from pdjax.structure import ControlIds


class ServingProgram(_Program):
    """The decoder's program with what a serving engine adds: refill rows, a bounded chunk, the split iteration."""

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
                           until_finish, step=self.split_step if split else None)
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
        self._program = ServingProgram(static)
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
