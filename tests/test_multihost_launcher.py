"""launch/local_cluster.py without JAX: environment per process, exit code = first failure, bounded, all reaped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster import ROOT, local_cluster

LAUNCHER = [sys.executable, str(ROOT / "launch" / "local_cluster.py")]


def launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=timeout)


def test_every_process_gets_the_cluster_environment(tmp_path):
    script = ("import os; print(' '.join(os.environ[k] for k in ('JAX_PROCESS_ID', 'JAX_NUM_PROCESSES', "
              "'JAX_COORDINATOR_ADDRESS', 'XLA_FLAGS')))")
    r = launch("--num_processes", "3", "--devices_per_process", "2", "--log_dir", str(tmp_path), "--echo", "all",
               "--", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    logs = [(tmp_path / f"process_{p}.log").read_text().split() for p in range(3)]
    assert [log[:2] for log in logs] == [[str(p), "3"] for p in range(3)]
    address = {log[2] for log in logs}
    assert len(address) == 1 and address.pop().startswith("127.0.0.1:")
    assert all(log[3] == "--xla_force_host_platform_device_count=2" for log in logs)
    assert sorted(line.split()[0] for line in r.stdout.splitlines()) == ["[p0]", "[p1]", "[p2]"]


def test_the_first_failure_is_the_exit_code_and_a_hanging_host_is_killed_after_the_grace(tmp_path):
    # process 1 fails with 3; process 0 would wait forever (as a host stuck in a collective does)
    script = "import os, sys, threading; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else threading.Event().wait()"
    r = launch("--num_processes", "2", "--grace", "2", "--log_dir", str(tmp_path), "--", sys.executable, "-c", script)
    assert r.returncode == 3, r.stderr
    assert "process 1 failed first (exit 3)" in r.stderr


def test_timeout_kills_everything_and_exits_124(tmp_path):
    marker = tmp_path / "child.pid"
    # each process starts a grandchild that would outlive it: the whole session must go
    script = (f"import subprocess, sys, threading; p = subprocess.Popen([sys.executable, '-c', "
              f"'import threading; threading.Event().wait()']); open('{marker}' + str(p.pid), 'w').close(); "
              "threading.Event().wait()")
    r = launch("--num_processes", "2", "--timeout", "5", "--log_dir", str(tmp_path / "logs"), "--",
               sys.executable, "-c", script)
    assert r.returncode == 124, r.stderr
    children = [int(f.name.removeprefix("child.pid")) for f in tmp_path.glob("child.pid*")]
    assert len(children) == 2
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_wait_for_sees_a_line_without_polling_sleeps(tmp_path):
    script = "import sys, threading; print('ready', flush=True); threading.Event().wait()"
    with local_cluster.LocalCluster([sys.executable, "-c", script], num_processes=2, log_dir=str(tmp_path),
                                    env=dict(os.environ)) as c:
        for p in range(2):
            assert c.wait_for(p, r"^ready$", timeout=30)
        assert c.returncodes() == [None, None]
    assert all(code is not None for code in c.returncodes())  # reaped on leaving the block


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    """The launcher forwards a preemption notice (or Ctrl-C) to every host and returns their exit code."""
    script = ("import signal, sys, threading; done = threading.Event(); "
              "signal.signal(signal.SIGTERM, lambda *a: done.set()); print('ready', flush=True); "
              "done.wait(60) or sys.exit(5); print('got SIGTERM', flush=True)")
    command = [*LAUNCHER, "--num_processes", "2", "--echo", "all", "--log_dir", str(tmp_path / "logs"), "--",
               sys.executable, "-c", script]
    with local_cluster.LocalCluster(command, num_processes=1, log_dir=str(tmp_path), env=dict(os.environ)) as c:
        for p in range(2):
            c.wait_for(0, rf"^\[p{p}\] ready$", timeout=30)
        c.signal(0, 15)
        assert c.wait(30) == [0]
        for p in range(2):
            c.wait_for(0, rf"^\[p{p}\] got SIGTERM$", timeout=5)
