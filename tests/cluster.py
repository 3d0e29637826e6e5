"""The local-cluster fixture of the multi-host tests, built on `launch/local_cluster.py`'s `LocalCluster`.

``cluster(command, num_processes=2)`` starts N processes of one command on
127.0.0.1 forming a `jax.distributed` cluster (2 CPU devices each by default),
with the worktree first on ``PYTHONPATH`` and a short heartbeat timeout; every
cluster a test started is killed and reaped when the test ends, passed or not.
`finish` waits (bounded) and fails the test with every process's log tail.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 10  # a host that died is noticed by the others within about this long


def _load_launcher():
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "launch" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_cluster", module)
    spec.loader.exec_module(module)
    return module


local_cluster = _load_launcher()
LocalCluster = local_cluster.LocalCluster


def cluster_env(extra: Mapping[str, str] = ()) -> dict[str, str]:
    """The test process's environment for the cluster: this worktree's pdjax, CPU only, offline, quick heartbeat."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_PROCESS", "JAX_NUM_PROC"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_HEARTBEAT_TIMEOUT_SECONDS=str(HEARTBEAT_S))
    env.update(extra)
    return env


def tails(cluster: "LocalCluster", lines: int = 40) -> str:
    """The last lines of every process's output, for failure messages."""
    out = []
    for p in range(cluster.num_processes):
        text = cluster.output(p).splitlines()[-lines:]
        out.append(f"--- process {p} (rc {cluster.procs[p].poll()}), {cluster.log_path(p)}:\n" + "\n".join(text))
    return "\n".join(out)


def finish(cluster: "LocalCluster", timeout: float, *, expect: int | None = 0) -> list[int]:
    """Wait for every process (at most `timeout` s); with `expect`, fail unless every exit code equals it."""
    try:
        codes = cluster.wait(timeout)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{tails(cluster)}")
    if expect is not None and any(c != expect for c in codes):
        pytest.fail(f"exit codes {codes}, expected all {expect}\n{tails(cluster)}")
    return codes


@pytest.fixture(name="cluster")
def cluster_fixture(tmp_path) -> Iterator[Callable[..., "LocalCluster"]]:
    """Start local clusters; all of them are killed and reaped at the end of the test."""
    started: list[LocalCluster] = []

    def start(command: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 2,
              env: Mapping[str, str] = (), name: str | None = None) -> LocalCluster:
        log_dir = tmp_path / f"{name or 'cluster'}-{len(started)}"
        c = LocalCluster([str(x) for x in command], num_processes=num_processes,
                         devices_per_process=devices_per_process, log_dir=str(log_dir), env=cluster_env(env),
                         cwd=str(ROOT))
        started.append(c)  # before starting: a start that fails half-way is reaped too
        return c.start()

    try:
        yield start
    finally:
        for c in started:
            c.kill()
        assert all(proc.poll() is not None for c in started for proc in c.procs), "a cluster process survived"
