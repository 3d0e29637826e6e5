#!/usr/bin/env python3
"""Rehearse a multi-host slice on one machine: N processes on 127.0.0.1 form one `jax.distributed` cluster.

Every process runs the same command with ``JAX_COORDINATOR_ADDRESS`` (a free
local port), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D CPU devices each), as
`python -m pdjax.train` / `pdjax.eval` expect on a slice. Each process's output
goes to ``LOG_DIR/process_P.log`` (process 0's is also echoed with a ``[p0]``
prefix). The run is bounded (``--timeout``); when one process fails, the others
get ``--grace`` seconds to exit on their own and are then killed; every process
(and its children) is reaped. The exit code is the first failing process's.

    python launch/local_cluster.py --num_processes 2 --devices_per_process 2 -- \\
        python -m pdjax.train --config configs/tiny_cpu.yaml mesh.data=2 mesh.fsdp=2

`LocalCluster` is the same machinery as a library (the test suite's fixture).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Callable, Mapping, Sequence

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the launcher dies, so no host outlives a killed launcher."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def process_env(base: Mapping[str, str], *, coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
    """The environment of one cluster process: coordinator, rank, CPU device count (other XLA flags kept)."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_FLAG}={devices_per_process}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_COORDINATOR_ADDRESS"] = coordinator
    env["JAX_NUM_PROCESSES"] = str(num_processes)
    env["JAX_PROCESS_ID"] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed
    return env


class LocalCluster:
    """N processes of one command forming a local JAX cluster; a context manager that always reaps them.

    ``wait_for(p, pattern, timeout)`` blocks until process p prints a matching line (a condition
    variable fed by the log readers, no polling); ``wait(timeout)`` until all have exited.
    """

    def __init__(self, command: Sequence[str], *, num_processes: int, devices_per_process: int = 2,
                 log_dir: str | None = None, env: Mapping[str, str] | None = None, cwd: str | None = None,
                 echo: Callable[[int, str], None] | None = None, per_process_env: Sequence[Mapping[str, str]] = ()):
        if num_processes < 1 or devices_per_process < 1:
            raise ValueError("num_processes and devices_per_process must be >= 1")
        self.command = list(command)
        self.num_processes = num_processes
        self.devices_per_process = devices_per_process
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="pdjax-cluster-")
        self.env = dict(os.environ if env is None else env)
        self.per_process_env = list(per_process_env)
        self.cwd = cwd
        self.echo = echo
        self.coordinator = ""
        self.procs: list[subprocess.Popen] = []
        self.lines: list[list[str]] = [[] for _ in range(num_processes)]
        self._readers: list[threading.Thread] = []
        self.first_failed: int | None = None  # the process that failed first (before any kill of ours)
        self._changed = threading.Condition()

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        """Spawn every process (each in its own session, so that its children are reaped with it)."""
        os.makedirs(self.log_dir, exist_ok=True)
        self.coordinator = f"127.0.0.1:{free_port()}"
        for p in range(self.num_processes):
            env = process_env(self.env, coordinator=self.coordinator, num_processes=self.num_processes,
                              process_id=p, devices_per_process=self.devices_per_process)
            if p < len(self.per_process_env):
                env.update(self.per_process_env[p])
            proc = subprocess.Popen(self.command, env=env, cwd=self.cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    text=True, errors="replace", bufsize=1,
                                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            self.procs.append(proc)
            log = open(self.log_path(p), "w")
            reader = threading.Thread(target=self._read, args=(p, proc.stdout, log), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:  # the hosts already started must not outlive a failed start
            self.kill()
            raise

    def __exit__(self, *exc) -> None:
        self.kill()

    def log_path(self, p: int) -> str:
        return os.path.join(self.log_dir, f"process_{p}.log")

    def _read(self, p: int, stream: IO[str], log: IO[str]) -> None:
        with log:
            for line in stream:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines[p].append(line.rstrip("\n"))
                    self._changed.notify_all()
                if self.echo is not None:
                    self.echo(p, line.rstrip("\n"))
        with self._changed:  # end of output: wake waiters so that they see the exit
            self._changed.notify_all()

    # ---- observing ----------------------------------------------------------------------------

    def returncodes(self) -> list[int | None]:
        return [proc.poll() for proc in self.procs]

    def output(self, p: int) -> str:
        with self._changed:
            return "\n".join(self.lines[p])

    def wait_for(self, p: int, pattern: str, timeout: float) -> re.Match:
        """The first line of process p matching `pattern`; raises TimeoutError (or if p ends without one)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[p][seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines[p])
                if not self._readers[p].is_alive():
                    raise TimeoutError(f"process {p} ended (rc {self.procs[p].poll()}) without printing /{pattern}/")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"process {p} printed no /{pattern}/ within {timeout:.0f} s")
                self._changed.wait(min(left, 1.0))  # readers notify; the 1 s cap only re-checks liveness

    def wait(self, timeout: float, *, grace: float | None = None) -> list[int]:
        """Wait (at most `timeout` s) for every process; return their exit codes.

        With ``grace``, once a process fails the others have `grace` seconds to exit, then are killed.
        Processes still running at the deadline are killed (-SIGKILL) and TimeoutError is raised.
        """
        deadline = time.monotonic() + timeout
        grace_deadline = None
        while True:
            codes = self.returncodes()
            if self.first_failed is None:
                self.first_failed = next((p for p, c in enumerate(codes) if c not in (None, 0)), None)
            if all(c is not None for c in codes):
                self._join_readers()
                return codes  # type: ignore[return-value]
            if grace is not None and grace_deadline is None and any(c not in (None, 0) for c in codes):
                grace_deadline = time.monotonic() + grace
            running = [p for p, c in enumerate(codes) if c is None]
            if grace_deadline is not None and time.monotonic() >= grace_deadline:
                self.kill()  # a host failed and the others did not follow: end them, report the failure
                return self.returncodes()  # type: ignore[return-value]
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"processes {running} still ran after {timeout:.0f} s; killed (logs in {self.log_dir})")
            if grace_deadline is not None:
                left = min(left, grace_deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[running[0]].wait(timeout=max(0.0, min(left, 0.5)))  # wake to look at the others too

    def _join_readers(self) -> None:
        for reader in self._readers:
            reader.join(timeout=10)

    # ---- acting -------------------------------------------------------------------------------

    def signal(self, p: int, sig: int) -> None:
        """Send `sig` to process p itself (as a TPU maintenance event or the OOM killer would)."""
        if self.procs[p].poll() is None:
            os.kill(self.procs[p].pid, sig)

    def kill(self) -> None:
        """SIGKILL every process's whole session and reap it (idempotent)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        self._join_readers()


def first_failure(codes: Sequence[int], first: int | None = None) -> int:
    """The exit code of the cluster: 0, else process `first`'s (the earliest failure), else the first nonzero one.

    A process ended by signal N counts 128 + N, as in a shell.
    """
    order = ([first] if first is not None else []) + list(range(len(codes)))
    for p in order:
        if codes[p]:
            return 128 - codes[p] if codes[p] < 0 else codes[p]
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python launch/local_cluster.py",
        description="Run one command as N processes of a local JAX cluster (a slice rehearsed on one machine).",
        epilog="example:\n  python launch/local_cluster.py --num_processes 2 --devices_per_process 2 -- "
               "python -m pdjax.train --config configs/tiny_cpu.yaml mesh.data=2 mesh.fsdp=2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--num_processes", type=int, default=2, help="hosts to simulate (default 2)")
    p.add_argument("--devices_per_process", type=int, default=2, help="CPU devices per host (default 2)")
    p.add_argument("--log_dir", help="per-process logs process_P.log (default: a new temporary folder)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before every process is killed (default 3600)")
    p.add_argument("--grace", type=float, default=60,
                   help="seconds the others get to exit after one process fails, then are killed (default 60)")
    p.add_argument("--echo", choices=("0", "all", "none"), default="0", help="whose output to print (default: process 0)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the cluster, forward Ctrl-C / SIGTERM to every process, return the first failure."""
    args = parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser().error("give the command after --")
    lock = threading.Lock()

    def echo(p: int, line: str) -> None:
        if args.echo == "all" or (args.echo == "0" and p == 0):
            with lock:
                print(f"[p{p}] {line}", flush=True)

    cluster = LocalCluster(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                           log_dir=args.log_dir, echo=echo)

    def forward(signum: int, _frame) -> None:  # a preemption notice to the launcher reaches every host
        for p in range(len(cluster.procs)):
            cluster.signal(p, signum)

    signal.signal(signal.SIGTERM, forward)  # before any process exists: no notice can kill the launcher alone
    signal.signal(signal.SIGINT, forward)
    with cluster:
        print(f"local cluster: {args.num_processes} processes x {args.devices_per_process} CPU devices, "
              f"coordinator {cluster.coordinator}, logs in {cluster.log_dir}", file=sys.stderr, flush=True)
        try:
            codes = cluster.wait(args.timeout, grace=args.grace)
        except TimeoutError as e:
            print(f"local cluster: {e}", file=sys.stderr)
            return 124
    if cluster.first_failed is not None:
        p = cluster.first_failed
        print(f"local cluster: process {p} failed first (exit {codes[p]}); its log: {cluster.log_path(p)}",
              file=sys.stderr)
    for p, code in enumerate(codes):
        if code and p != cluster.first_failed:
            print(f"local cluster: process {p} exited with {code}; its log: {cluster.log_path(p)}", file=sys.stderr)
    return first_failure(codes, cluster.first_failed)


if __name__ == "__main__":
    sys.exit(main())
