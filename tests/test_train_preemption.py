"""Preemption: SIGTERM / SIGINT to a real `python -m pdjax.train` stop it at a checkpointed step; resuming is exact.

Every run here is a child process on one CPU device, training the tiny model
of test_train_loop for STEPS steps and logging every step to metrics.jsonl.
The signal is sent once the child has logged step SIGNAL_AFTER (its stdout is
read line by line; every wait is bounded). The expectation of every
interrupted-and-resumed run is the uninterrupted run of the same config:
each step logged once, with the same loss bit for bit. The children share
one XLA compilation cache, so only the first compiles.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train_loop import tokenizer, write_rows

STEPS = 100
SIGNAL_AFTER = 3
EVERY = 10  # periodic checkpoints
TIMEOUT_S = 240  # per child: import, data, compile (cold cache) and STEPS tiny steps on a loaded 2-core machine
ROOT = Path(__file__).resolve().parents[1]
TIMING = {"step_time_s", "tokens_per_s", "mfu", "compile_and_step_s"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """The tokenizer folder, the rows, a datasets cache and an XLA compilation cache shared by all children."""
    d = tmp_path_factory.mktemp("preempt")
    tokenizer().save_pretrained(str(d / "tokenizer"))
    write_rows(d / "rows.jsonl")
    return d


def run_args(files: Path, name: str) -> list[str]:
    """`python -m pdjax.train` flags and overrides of one run (its own checkpoint and log folders)."""
    run = files / name
    return [
        f"data.source={files / 'rows.jsonl'}",
        f"data.cache_dir={files / 'cache'}",
        f"data.skipped_path={run / 'skipped.jsonl'}",
        "data.row_length=48",
        "data.batch_size=8",
        "data.num_epochs=null",
        "data.num_threads=0",
        "data.pad_max=2",
        f"steps={STEPS}",
        f"model.tokenizer={files / 'tokenizer'}",
        "model.vocab_size=128",
        "optimizer.learning_rate=3e-3",
        "optimizer.warmup_steps=5",
        "log.every_steps=1",
        "log.tensorboard=false",
        f"checkpoint.dir={run / 'ckpt'}",
        f"checkpoint.every_steps={EVERY}",
        "mesh.data=-1",
    ]


def child_env(files: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        JAX_COMPILATION_CACHE_DIR=str(files / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def train(
    files: Path, argv: list[str], *, signals: tuple[int, ...] = (), after: str = rf"step {SIGNAL_AFTER}/"
) -> tuple[int, str]:
    """Run `python -m pdjax.train argv`; once it prints a line starting with `after` send `signals` (back to back).

    Returns (exit status, stdout + stderr). Fails if the child ends before the signal could be sent.
    """
    cmd = [sys.executable, "-m", "pdjax.train", *argv]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(files), cwd=str(files)
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    pending = list(signals)
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"pdjax.train did not finish within {TIMEOUT_S} s:\n{''.join(out)}")
            if line is None:
                break
            out.append(line)
            if pending and re.match(after, line):
                for s in pending:
                    proc.send_signal(s)
                pending = []
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=10)
    text = "".join(out)
    assert not pending, f"the run ended before it printed {after!r} (rc {proc.returncode}):\n{text}"
    return rc, text


def metrics(files: Path, name: str) -> list[dict]:
    """metrics.jsonl of a run without the wall-clock fields."""
    path = files / name / "ckpt" / "logs" / "metrics.jsonl"
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def checkpoints(files: Path, name: str) -> list[int]:
    return sorted(int(p.name) for p in (files / name / "ckpt").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(files) -> list[dict]:
    """The uninterrupted run: every step's metrics."""
    rc, out = train(files, run_args(files, "straight"))
    assert rc == 0, out
    logged = metrics(files, "straight")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    return logged


def resume_line(out: str) -> list[str]:
    """The command the stopped run printed for resuming, as argv for this interpreter."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.endswith("resume with:"))
    argv = shlex.split(lines[i + 1])
    assert argv[:3] == ["python", "-m", "pdjax.train"] and "--resume" in argv
    return argv[3:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_a_saved_step_and_resume_equals_the_uninterrupted_run(files, straight, signum):
    name = signal.Signals(signum).name
    rc, out = train(files, run_args(files, name), signals=(signum,))
    assert rc == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    stop = int(re.search(rf"stopped by {name} at step (\d+), saved to ", out).group(1))
    assert SIGNAL_AFTER <= stop < STEPS
    assert checkpoints(files, name)[-1] == stop  # the stop step itself is checkpointed
    assert f"saving checkpoint step {stop} to " in out and "compiling the train step" in out
    first = metrics(files, name)
    assert [r["step"] for r in first] == list(range(1, stop + 1))

    rc, out2 = train(files, resume_line(out))  # exactly the printed command
    assert rc == 0, out2
    assert f"restored step {stop} from" in out2
    logged = metrics(files, name)
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # every step once
    assert logged == straight  # losses (and every other metric) bit for bit


def test_a_second_signal_aborts_at_once_and_the_last_complete_checkpoint_resumes_exactly(files, straight):
    # once the save of step 2 * EVERY has started (the next step is logged), the one of step EVERY is complete:
    # orbax finishes a save before it starts the next
    rc, out = train(
        files, run_args(files, "abort"), signals=(signal.SIGTERM, signal.SIGINT), after=f"step {2 * EVERY + 1}/"
    )
    # both are pending at once when the child gets to run: Python may handle them in either order
    second = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}
    assert rc in second, out
    assert f"second signal ({second[rc]}): aborting now" in out and "stopped by" not in out
    saved = checkpoints(files, "abort")
    assert saved and saved[-1] % EVERY == 0 and saved[-1] >= EVERY  # periodic saves only; nothing half-written counts
    logged_before = [r["step"] for r in metrics(files, "abort")]
    assert logged_before[-1] > saved[-1]  # the aborted run logged steps that no checkpoint holds

    rc, out2 = train(files, ["--resume", *run_args(files, "abort")])
    assert rc == 0, out2
    assert f"restored step {saved[-1]} from" in out2
    assert f"after step {saved[-1]} logged by an earlier (interrupted) run" in out2
    logged = metrics(files, "abort")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert logged == straight


def test_ctrl_c_during_setup_exits_without_a_traceback(files):
    # the data report's last line comes before the model, the optimizer and the loop are set up
    rc, out = train(files, run_args(files, "setup"), signals=(signal.SIGINT,), after="  packing:")
    assert rc == 130, out
    assert "interrupted outside the training loop: nothing to save" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out


def test_the_resume_command_keeps_every_flag_and_override():
    from pdjax.train.cli import resume_command

    assert resume_command(["--config", "c.yaml", "steps=600", "a.b=x y"]) == (
        "python -m pdjax.train --config c.yaml --resume steps=600 'a.b=x y'"
    )
    assert resume_command(["--config=c.yaml"]) == "python -m pdjax.train --config=c.yaml --resume"
    assert resume_command(["--resume", "steps=3"]) == "python -m pdjax.train --resume steps=3"


def test_the_guard_turns_sigint_into_a_stop_request_and_restores_the_handlers():
    from pdjax.train.preemption import Preemption

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with Preemption(log=None) as guard:
        assert not guard.sync_point and not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        deadline = time.monotonic() + 10
        while guard.requested is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the watcher thread records it
        assert guard.requested == signal.SIGINT and guard.reason == "SIGINT"
        assert guard.should_stop(2)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back


def test_a_ctrl_c_inside_a_gc_callback_is_sent_again_not_lost(monkeypatch):
    """Python swallows an exception raised in a gc callback: the setup handler re-sends SIGINT from there."""
    import gc
    import sys as _sys

    from pdjax.train import cli

    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(cli.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    outcome: list[str] = []

    def callback(phase, info):
        if phase == "start" and not outcome:
            try:
                cli.setup_interrupt(signal.SIGINT, _sys._getframe())
                outcome.append("returned")
            except KeyboardInterrupt:
                outcome.append("raised")

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert outcome == ["returned"]
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [(os.getpid(), signal.SIGINT)]
    with pytest.raises(KeyboardInterrupt):  # anywhere else: at once, as Python's default handler
        cli.setup_interrupt(signal.SIGINT, _sys._getframe())
