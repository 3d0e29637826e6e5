"""The serving engine: continuous batching over the decoder's slots, as a library object (no HTTP).

JetStream's orchestrator in miniature: B decode slots (`pdjax.decode.slots.Slots`)
and a FIFO queue. Each `step` is one device call and one host sync: slots whose
request finished (or was cancelled) are refilled from the queue, their prefill
joins the chunk, the chunk runs at most `chunk` loop iterations (it ends early
when a slot frees up while requests wait), and the host then hands every
request the response tokens that became final (`Update`) and the result of
each finished one. A request's answer is exactly `Decoder.generate`'s for the
same prompt and options (`tests/test_serve_engine.py`).

`submit` is thread-safe; `step` runs on one thread at a time (the engine's own
thread after `start`, or the caller's in tests and `generate`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from pdjax.decode.api import DecodeInputError, Decoder, DecodeResult
from pdjax.decode.decoder import DecodeOptions, Output, host_knobs, stack_knobs
from pdjax.decode.slots import Slots


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already (HTTP 429)."""


class EngineStopped(Exception):
    """The engine no longer accepts requests (it is draining or stopped; HTTP 503)."""


@dataclasses.dataclass
class Update:
    """What a request learns after a chunk: response tokens that became final, and its result once done.

    ``tokens`` continue the earlier updates' (control tokens included; a group's tokens arrive
    once all its spans are denoised). ``result`` is set on the last update; ``cancelled`` or
    ``error`` on the last update of a request that ends without one.
    """

    tokens: list[int]
    result: DecodeResult | None = None
    cancelled: bool = False
    error: str | None = None

    @property
    def last(self) -> bool:
        """Whether this is the request's final update."""
        return self.result is not None or self.cancelled or self.error is not None


class Ticket:
    """A submitted request: its updates go to `on_update` (called on the engine's thread); `cancel` frees its slot."""

    def __init__(self, rid: int, prompt_ids: list[int], options: DecodeOptions, knobs: Any,
                 on_update: Callable[[Update], None] | None):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.options = options
        self.knobs = knobs
        self.on_update = on_update
        self.submitted = time.perf_counter()
        self.started_iteration = 0
        self.sent = 0  # response tokens already handed out
        self.cancelled = False
        self.result: DecodeResult | None = None
        self.outcome: Update | None = None
        self._done = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request (its slot is refilled at the next step); idempotent."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """Whether the request has ended (answered, cancelled or failed)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> DecodeResult:
        """Block until the result exists; raises TimeoutError, or RuntimeError if it ended without one."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not answered within {timeout} s")
        if self.result is None:
            raise RuntimeError(f"request {self.id} ended without a result ({self.outcome})")
        return self.result

    def _emit(self, update: Update) -> None:
        if update.last:
            self.result, self.outcome = update.result, update
        if self.on_update is not None:
            self.on_update(update)
        if update.last:
            self._done.set()


class Engine:
    """Continuous batching over a `Decoder`'s model: `submit` requests, `step` (or `start` a thread) to serve them.

    ``chunk`` bounds the loop iterations per device call (the host sees results and refills
    slots between chunks); ``max_queue`` bounds the requests waiting for a slot. ``static``
    admits requests only when every slot is free (static batches: the baseline that continuous
    batching is measured against in `benchmarks/serve_load.py`). ``schedule`` is how one loop
    iteration serves the slots (`pdjax.decode.slots.resolve_schedule`: ``auto``, ``split`` or ``shared``).
    """

    def __init__(self, decoder: Decoder, *, chunk: int = 16, max_queue: int = 1024, static: bool = False,
                 schedule: str = "auto", device: Any = None,
                 _shared: tuple[collections.deque, threading.Condition, Callable[[], int]] | None = None):
        if chunk < 1 or max_queue < 0:
            raise ValueError(f"chunk must be >= 1 and max_queue >= 0, got {chunk} and {max_queue}")
        self.decoder = decoder
        self.device = device  # the JAX device this engine's calls run on (None: the default one)
        self.config = decoder.config
        self.chunk = chunk
        self.max_queue = max_queue
        self.static = static
        self.slots = Slots(decoder.forward, eos_id=decoder.eos_id, ids=decoder.ids, config=decoder.config,
                           vocab_size=decoder.vocab_size, schedule=schedule)
        b, width = self.config.batch_size, self.config.max_length + 1
        self._blank = host_knobs(DecodeOptions(), self.config.max_length)
        self._knobs = stack_knobs([self._blank] * b)
        self._tokens = np.zeros((b, width), np.int32)
        self._rows: list[Ticket | None] = [None] * b
        if _shared is None:
            self._queue: collections.deque[Ticket] = collections.deque()
            self._cond = threading.Condition()
            self._capacity: Callable[[], int] = self._free_slots
        else:  # a replica of `Replicas`: one queue (and its lock) for all, free slots counted over all
            self._queue, self._cond, self._capacity = _shared
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self._state: Any = None
        self._iteration = 0
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counts = collections.Counter()  # submitted, completed, cancelled, rejected, failed, steps

    # ---- requests ---------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], options: DecodeOptions = DecodeOptions(),
               on_update: Callable[[Update], None] | None = None) -> Ticket:
        """Queue a request (token ids, chat template applied). Raises DecodeInputError (a prompt the decoder
        cannot take), QueueFull or EngineStopped; knob values were validated by `DecodeOptions`."""
        ids = self.decoder.check_prompt(prompt_ids)
        knobs = host_knobs(options, self.config.max_length)
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down and accepts no new requests")
            if len(self._queue) >= self.max_queue + self._capacity():
                self.counts["rejected"] += 1
                raise QueueFull(f"{len(self._queue)} requests are waiting already (max_queue {self.max_queue})")
            ticket = Ticket(next(self._ids), ids, options, knobs, on_update)
            self._queue.append(ticket)
            self.counts["submitted"] += 1
            self._cond.notify_all()
        return ticket

    def _free_slots(self) -> int:
        return sum(t is None for t in self._rows)

    def generate(self, prompts: Sequence[Sequence[int]], options: DecodeOptions = DecodeOptions(),
                 timeout: float = 600.0) -> list[DecodeResult]:
        """Serve every prompt and return results in prompt order (steps on this thread unless `start` was called)."""
        if len(prompts) > self.max_queue + self.config.batch_size:
            raise QueueFull(f"{len(prompts)} prompts exceed max_queue + batch_size")
        return _answer_all(self.submit, self.step, lambda: self._thread is not None, prompts, options, timeout)

    def stats(self) -> dict[str, int]:
        """Requests running, waiting, and counted so far; compiled programs."""
        with self._cond:
            out = {"running": self.config.batch_size - self._free_slots(), "waiting": len(self._queue)}
            out.update({k: self.counts[k] for k in ("submitted", "completed", "cancelled", "rejected", "failed")})
        out["steps"] = self.counts["steps"]
        out["compiled_programs"] = self.slots.compiled_programs()
        return out

    @property
    def idle(self) -> bool:
        """No request running or waiting."""
        with self._cond:
            return not self._queue and self._free_slots() == self.config.batch_size

    # ---- the device loop --------------------------------------------------------------

    def warmup(self) -> float:
        """Compile the program (one call that admits nothing); returns the seconds it took."""
        t0 = time.perf_counter()
        with self._step_lock, self._on_device():
            self._ensure_state()
            b = self.config.batch_size
            self._state, _ = self.slots.advance(self._state, np.zeros(b, bool), self._tokens, np.zeros(b, np.int32),
                                                self._knobs, 0)
        return time.perf_counter() - t0

    def _on_device(self) -> Any:
        """Run JAX calls on this engine's device (JAX's default-device setting is per thread)."""
        if self.device is None:
            return contextlib.nullcontext()
        import jax

        return jax.default_device(self.device)

    def _ensure_state(self) -> None:
        if self._state is None:
            self._state = self.slots.empty()

    def step(self) -> bool:
        """One device call if any request is running or waiting: refill free slots, run a chunk, hand out
        updates. Returns whether it ran."""
        with self._step_lock, self._on_device():
            self._ensure_state()
            b = self.config.batch_size
            admit = np.zeros(b, bool)
            lengths = np.zeros(b, np.int32)
            ended: list[tuple[Ticket, Update]] = []
            with self._cond:
                for i, t in enumerate(self._rows):
                    if t is not None and t.cancelled:  # a cancelled row is emptied (or refilled below)
                        self._rows[i], admit[i] = None, True
                        self.counts["cancelled"] += 1
                        ended.append((t, Update([], cancelled=True)))
                busy = self.static and any(t is not None for t in self._rows)
                for i in range(0 if busy else b):
                    if self._rows[i] is not None:
                        continue
                    t = self._next_waiting(ended)
                    if t is None:
                        break
                    self._rows[i], admit[i] = t, True
                    self._tokens[i] = 0
                    self._tokens[i, : len(t.prompt_ids)] = t.prompt_ids
                    lengths[i] = len(t.prompt_ids)
                    for buf, row in zip(self._knobs, t.knobs):
                        _set_row(buf, i, row)
                    t.started_iteration = self._iteration
                running = [i for i, t in enumerate(self._rows) if t is not None]
                waiting = bool(self._queue) and not self.static
            for t, u in ended:
                t._emit(u)
            if not running and not admit.any():
                return bool(ended)
            try:
                self._state, view = self.slots.advance(self._state, admit, self._tokens, lengths, self._knobs,
                                                       self.chunk, until_finish=waiting)
            except Exception as e:  # a device failure ends the requests in the slots, not the server
                self._fail(running, f"{type(e).__name__}: {e}")
                raise
            self.counts["steps"] += 1
            self._iteration = int(view.iteration)
            self._hand_out(view, running)
            return True

    def _next_waiting(self, ended: list[tuple[Ticket, Update]]) -> Ticket | None:
        while self._queue:
            t = self._queue.popleft()
            if not t.cancelled:
                return t
            self.counts["cancelled"] += 1
            ended.append((t, Update([], cancelled=True)))
        return None

    def _hand_out(self, view: Any, running: list[int]) -> None:
        updates: list[tuple[Ticket, Update]] = []
        with self._cond:
            for i in running:
                t = self._rows[i]
                p = len(t.prompt_ids)
                final = int(view.n[i]) if view.done[i] else int(view.final[i])
                new = [int(x) for x in view.tokens[i, p + t.sent : final]]
                t.sent += len(new)
                if view.done[i]:
                    result = self._result(view, i, t)
                    self._rows[i] = None
                    self.counts["completed"] += 1
                    # diffusion: tokens after the first eos are filler, the result already dropped them
                    new = new[: max(0, len(new) - (t.sent - len(result.token_ids)))]
                    updates.append((t, Update(new, result=result)))
                elif new:
                    updates.append((t, Update(new)))
            if any(t is None for t in self._rows):
                self._cond.notify_all()
        for t, u in updates:
            t._emit(u)

    def _result(self, view: Any, i: int, t: Ticket) -> DecodeResult:
        iterations = np.int32(int(view.iteration) - t.started_iteration)
        out = Output(view.tokens, view.n, view.finish, view.calls, view.rounds, view.groups, view.spans, iterations,
                     None)
        # the Decoder's own reading of a row, so results match `Decoder.generate` field for field
        return self.decoder._result(out, i, t.prompt_ids, time.perf_counter() - t.submitted, None)

    def _fail(self, running: list[int], message: str) -> None:
        with self._cond:
            failed = [(self._rows[i], i) for i in running]
            for _, i in failed:
                self._rows[i] = None
            self.counts["failed"] += len(failed)
            self._state = None  # the donated state may be gone: start from empty slots
        for t, _ in failed:
            t._emit(Update([], error=message))

    # ---- the engine's thread ----------------------------------------------------------

    def start(self) -> None:
        """Serve on a background thread until `shutdown`."""
        if self._thread is not None:
            return
        with self._cond:
            self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="pdjax-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                ran = self.step()
            except Exception:  # already reported to the requests in the slots; keep serving the queue
                ran = True
            if not ran:
                with self._cond:
                    if not self._stop and not self._queue and not any(t is not None for t in self._rows):
                        self._cond.wait(0.5)

    def stop_accepting(self) -> None:
        """New submissions raise EngineStopped; requests already submitted are still served."""
        with self._cond:
            self._accepting = False

    def shutdown(self, drain_timeout: float = 30.0) -> bool:
        """Stop accepting, serve what was submitted for up to `drain_timeout` s, cancel the rest, stop the
        thread. Returns whether everything was served."""
        self.stop_accepting()
        deadline = time.monotonic() + drain_timeout
        while not self.idle and time.monotonic() < deadline:
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.01)
        drained = self.idle
        if not drained:
            with self._cond:
                left = [t for t in self._rows if t is not None] + list(self._queue)
                for t in left:
                    t.cancel()
        if self._thread is not None:
            self._stop = True
            with self._cond:
                self._cond.notify_all()
            self._thread.join(timeout=60)
            self._thread = None
        if not drained:
            self.step()  # ends the cancelled requests (their updates say cancelled)
            with self._cond:
                left = list(self._queue)
                self._queue.clear()
            for t in left:
                t._emit(Update([], cancelled=True))
        return drained


class Replicas:
    """Data-parallel serving: one `Engine` per device, all fed from one FIFO queue.

    Each replica holds the whole model on its own device and serves `batch_size` slots of its own
    with its own thread. A request goes to whichever replica frees a slot first, and its answer is the
    one a single engine gives (each replica runs the same program). This is how a model that fits one
    chip is served on a multi-chip host; on a CPU, host devices
    (`--xla_force_host_platform_device_count`) keep more cores busy than one program's threads do
    (`benchmarks/serve_engine.py`). The interface is `Engine`'s.
    """

    def __init__(self, decoders: Sequence[Decoder], devices: Sequence[Any], *, chunk: int = 16,
                 max_queue: int = 1024, static: bool = False, schedule: str = "auto"):
        if not decoders or len(decoders) != len(devices):
            raise ValueError(f"one decoder per device is needed, got {len(decoders)} and {len(devices)}")
        queue: collections.deque[Ticket] = collections.deque()
        cond = threading.Condition()
        shared = (queue, cond, self._free_slots)
        self.engines = [Engine(d, chunk=chunk, max_queue=max_queue, static=static, schedule=schedule, device=dev,
                               _shared=shared)
                        for d, dev in zip(decoders, devices)]
        self._queue, self._cond = queue, cond
        self.decoder = self.engines[0].decoder
        self.config = self.engines[0].config
        self.slots = self.engines[0].slots
        self.max_queue = max_queue

    def _free_slots(self) -> int:
        return sum(e._free_slots() for e in self.engines)

    def submit(self, prompt_ids: Sequence[int], options: DecodeOptions = DecodeOptions(),
               on_update: Callable[[Update], None] | None = None) -> Ticket:
        """Queue a request for the first replica with a free slot (`Engine.submit`'s errors)."""
        return self.engines[0].submit(prompt_ids, options, on_update)

    def generate(self, prompts: Sequence[Sequence[int]], options: DecodeOptions = DecodeOptions(),
                 timeout: float = 600.0) -> list[DecodeResult]:
        """Serve every prompt and return results in prompt order (replicas stepped in turn on this thread
        unless `start` was called)."""
        if len(prompts) > self.max_queue + self._free_slots():
            raise QueueFull(f"{len(prompts)} prompts exceed max_queue + free slots")
        return _answer_all(self.submit, lambda: [e.step() for e in self.engines],
                           lambda: self.engines[0]._thread is not None, prompts, options, timeout)

    def stats(self) -> dict[str, int]:
        """`Engine.stats` summed over the replicas; compiled programs per replica, and the replica count."""
        per = [e.stats() for e in self.engines]
        out = {k: sum(p[k] for p in per) for k in ("running", "submitted", "completed", "cancelled", "rejected",
                                                     "failed", "steps")}
        out["waiting"] = per[0]["waiting"]
        out["compiled_programs"] = max(p["compiled_programs"] for p in per)
        out["replicas"] = len(self.engines)
        return out

    @property
    def idle(self) -> bool:
        """No request running on any replica, none waiting."""
        return all(e.idle for e in self.engines)

    def warmup(self) -> float:
        """Compile every replica's program; returns the seconds it took."""
        return sum(e.warmup() for e in self.engines)

    def start(self) -> None:
        """Serve on one background thread per replica until `shutdown`."""
        for e in self.engines:
            e.start()

    def stop_accepting(self) -> None:
        """New submissions raise EngineStopped; requests already submitted are still served."""
        for e in self.engines:
            e.stop_accepting()

    def shutdown(self, drain_timeout: float = 30.0) -> bool:
        """Stop accepting, let every replica serve what was submitted for up to `drain_timeout` s in all,
        cancel the rest, stop the threads. Returns whether everything was served."""
        self.stop_accepting()
        deadline = time.monotonic() + drain_timeout
        while not self.idle and time.monotonic() < deadline and self.engines[0]._thread is not None:
            time.sleep(0.01)
        drained = True
        for e in self.engines:
            drained &= e.shutdown(max(0.0, deadline - time.monotonic()))
        return drained


def _answer_all(submit: Callable[..., Ticket], step: Callable[[], Any], threaded: Callable[[], bool],
                prompts: Sequence[Sequence[int]], options: DecodeOptions, timeout: float) -> list[DecodeResult]:
    """Submit every prompt, then step on this thread (or wait for the engine threads) until all are answered."""
    tickets = [submit(p, options) for p in prompts]
    deadline = time.monotonic() + timeout
    while not all(t.done for t in tickets):
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompts not answered within {timeout} s")
        if threaded():
            time.sleep(0.005)
        else:
            step()
    return [t.wait(0) for t in tickets]


def _set_row(buf: np.ndarray | Any, i: int, row: Any) -> None:
    """buf[i] = row for a knob leaf, or for each leaf of a knob pytree (SamplingParams)."""
    if isinstance(buf, np.ndarray):
        buf[i] = row
    else:
        for b, r in zip(buf, row):
            _set_row(b, i, r)


__all__ = ["DecodeInputError", "Engine", "EngineStopped", "QueueFull", "Replicas", "Ticket", "Update"]
