"""launch/tpu.py --dry-run prints the exact gcloud commands of a v5p-32 multi-host job."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--name", "pd-run", "--zone", "us-east5-a", "--project", "my-proj", "--dry-run"]


def dry_run(*argv: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "tpu.py"), *argv], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_create_v5p_32():
    (cmd,) = dry_run("create", *COMMON, "--accelerator", "v5p-32", "--spot")
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pd-run", "--zone=us-east5-a", "--project=my-proj",
        "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5", "--spot",
    ]


def test_setup_installs_pinned_versions_on_every_worker():
    build, scp, ssh = dry_run("setup", *COMMON)
    assert build[1:4] == ["-m", "pip", "wheel"] and build[-1] == str(ROOT)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == "dist/pdjax-0.1.0-py3-none-any.whl"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pd-run"] and "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    for pin in ("jax[tpu]==0.10.2", "flax==0.12.8", "optax==0.2.8", "orbax-checkpoint==0.12.8", "grain==0.2.18"):
        assert pin in remote
    assert "~/pdjax-0.1.0-py3-none-any.whl" in remote


def test_train_runs_on_all_workers_with_overrides():
    mkdir, scp, ssh = dry_run(
        "train", *COMMON, "--accelerator", "v5p-32", "--config", "configs/dream7b_planned_v5p.yaml",
        "--", "checkpoint.dir=gs://bucket/pd", "train.steps=1000",
    )
    # the config's folder exists on every worker before scp copies into it
    assert "--worker=all" in mkdir and mkdir[mkdir.index("--command") + 1] == "mkdir -p ~/configs"
    assert scp[4:7] == ["scp", "configs/dream7b_planned_v5p.yaml", "pd-run:configs/dream7b_planned_v5p.yaml"]
    assert "--worker=all" in ssh
    remote = ssh[ssh.index("--command") + 1]
    assert "python -m pdjax.train --config configs/dream7b_planned_v5p.yaml checkpoint.dir=gs://bucket/pd train.steps=1000" in remote
    assert remote.rstrip().endswith("&") and "nohup" in remote and "pdjax-train.log" in remote


def test_logs_and_delete():
    (logs,) = dry_run("logs", *COMMON, "--worker", "0")
    assert "--worker=0" in logs and "tail" in logs[logs.index("--command") + 1]
    (delete,) = dry_run("delete", *COMMON)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pd-run", "--zone=us-east5-a", "--project=my-proj", "--quiet"]


@pytest.mark.parametrize("accel,runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_other_generations(accel, runtime):
    (cmd,) = dry_run("create", *COMMON, "--accelerator", accel)
    assert f"--version={runtime}" in cmd


def test_unknown_accelerator_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "tpu.py"), "create", *COMMON, "--accelerator", "v9x-8"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode != 0 and "unknown accelerator type 'v9x-8'" in out.stderr
