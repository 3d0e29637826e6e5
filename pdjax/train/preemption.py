"""Stopping a run on SIGTERM / SIGINT at a step every host agrees on, so that it can be checkpointed and resumed.

TPU VMs are preempted and maintained with SIGTERM, ~30 s before they go; a
user stops a run with Ctrl-C. `Preemption` is what the training loop asks,
after every step, whether to stop:

* **One process** (no ``jax.distributed``): pdjax's own handlers catch SIGTERM
  and SIGINT; the loop stops after the step in flight.
* **Several hosts** (``jax.distributed.initialize`` ran): JAX's distributed
  runtime owns SIGTERM (its preemption notifier). A notice on any host
  reaches every host, and `jax.experimental.multihost_utils.
  reached_preemption_sync_point(step)` turns True on all of them at the same
  step (the fastest host's step + 1), as orbax's CheckpointManager uses it.
  SIGINT is forwarded to that notifier as a SIGTERM to this process, so
  Ctrl-C on one host stops the whole cluster at one step too.

Once the loop has decided to stop (``begin_stop``), any further SIGTERM or
SIGINT aborts the process at once (exit 128 + signal number) without
waiting for the checkpoint being written: orbax writes into a temporary
folder and renames it when complete, so the last complete checkpoint stays.
A second signal before that point aborts the same way (the user insists).

The handlers act in a watcher thread woken through `signal.set_wakeup_fd`,
so the abort happens even while the main thread is blocked in XLA or orbax.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def uses_sync_point() -> bool:
    """True when JAX's distributed runtime runs its preemption service (it then owns SIGTERM)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Preemption:
    """Context manager around a training loop: catches SIGTERM/SIGINT and answers `should_stop(step)`.

    Use it the same way on every host::

        with Preemption(log) as preemption:
            preemption.start(step)              # the step the loop starts from (all hosts equal)
            while ...:
                ... run one step; step += 1 ...
                if preemption.should_stop(step):  # every step, on every host, with the same step
                    preemption.begin_stop()       # from now on a signal aborts
                    ... save a checkpoint of `step` ...
                    break

    ``requested`` is the local signal (None on a host that only heard of the
    notice from another host); ``stopped_at`` is the step the loop stopped at.
    Outside the main thread no handler can be installed: only the multi-host
    sync point is consulted then.
    """

    def __init__(self, log: Callable[[str], None] | None = print, *, checkpoint_dir: str | None = None):
        self.log = log or (lambda _msg: None)
        self.checkpoint_dir = checkpoint_dir
        self.requested: int | None = None
        self.stopped_at: int | None = None
        self.sync_point = uses_sync_point()
        self._stopping = False
        self._installed = False
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        if jax.process_count() > 1 and not self.sync_point:
            self.log(
                "warning: jax_enable_preemption_service is off, so SIGTERM cannot be coordinated across hosts; "
                "signals keep their default action"
            )

    # ---- installation -----------------------------------------------------------------------

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self
        if jax.process_count() > 1 and not self.sync_point:
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        # Under the sync point JAX's notifier keeps SIGTERM; only SIGINT is ours (forwarded to it).
        for signum in self._local_signals():
            self._previous[signum] = signal.signal(signum, _ignore)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(read,), name="pdjax-preemption", daemon=True)
        self._watcher.start()
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if not self._installed:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        read, write = self._pipe
        os.close(write)  # the watcher reads EOF and ends
        self._watcher.join(timeout=5)
        os.close(read)
        self._pipe, self._watcher, self._installed = None, None, False

    def _local_signals(self) -> tuple[int, ...]:
        return (signal.SIGINT,) if self.sync_point and not self._stopping else SIGNALS

    def _watch(self, read: int) -> None:
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in SIGNALS:
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        with self._lock:
            first = self.requested is None and not self._stopping
            if first:
                self.requested = signum
        name = signal_name(signum)
        if not first:
            where = f" in {self.checkpoint_dir}" if self.checkpoint_dir else ""
            _say(f"second signal ({name}): aborting now; the last complete checkpoint{where} is kept")
            os._exit(128 + signum)
        if self.sync_point:
            if signum != signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier tells every host
            _say(f"{name} received: every host finishes its step, then saves and exits (signal again to abort)")
        else:
            _say(f"{name} received: finishing this step, then saving and exiting (signal again to abort)")

    # ---- the loop's questions ---------------------------------------------------------------

    def start(self, step: int) -> None:
        """Tell the sync point the step the loop starts from (a notice during setup then lands on a real step)."""
        if self.sync_point:
            from jax.experimental import multihost_utils

            multihost_utils.reached_preemption_sync_point(step)

    def should_stop(self, step: int) -> bool:
        """After `step` (steps done so far): True when this host, with every other one, stops here."""
        if self.sync_point:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None

    def begin_stop(self, step: int) -> None:
        """The loop stops at `step` and saves it: from now on any SIGTERM / SIGINT aborts at once."""
        self.stopped_at = step
        with self._lock:
            self._stopping = True
        if self._installed and self.sync_point:
            # Take SIGTERM back from JAX's notifier: its job is done, and a second notice must abort.
            self._previous.setdefault(signal.SIGTERM, signal.signal(signal.SIGTERM, _ignore))
        if self.requested is None and self.sync_point:
            self.log(f"preemption notice from another host: every host stops at step {step}")

    @property
    def reason(self) -> str:
        """What stopped the run, for messages: ``SIGTERM``, ``SIGINT`` or a preemption notice."""
        return signal_name(self.requested) if self.requested is not None else "a preemption notice"


def _ignore(_signum, _frame) -> None:
    """The Python-level handler: the watcher thread (woken by the wakeup fd) does the work."""


def _say(message: str) -> None:
    """One line on stderr from the watcher thread (stdout may be held by a progress bar)."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
