"""launch/tpu.py --dry-run prints the exact gcloud commands of a v5p-32 multi-host job; every documented example
runs as written; accelerator types are the ones Cloud TPU offers."""

import importlib.util
import os
import re
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


def test_setup_installs_the_constraints_files_versions_on_every_worker():
    build, scp_wheel, scp_constraints, ssh = dry_run("setup", *COMMON)
    assert build[1:4] == ["-m", "pip", "wheel"] and build[-1] == str(ROOT)
    assert scp_wheel[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp_wheel
    assert scp_wheel[5] == "dist/pdjax-0.1.0-py3-none-any.whl"
    # the repository's constraints.txt goes to every worker, and pip installs under it
    assert scp_constraints[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "constraints.txt",
                                   "pd-run:pdjax-constraints.txt"] and "--worker=all" in scp_constraints
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pd-run"] and "--worker=all" in ssh
    remote = shlex.split(ssh[ssh.index("--command") + 1].split("&&")[3])
    assert remote == ["pip", "install", "-q", "-c", "~/pdjax-constraints.txt", "jax[tpu]==0.10.2",
                      "~/pdjax-0.1.0-py3-none-any.whl"]


def test_setup_with_another_pdjax_still_installs_under_the_constraints():
    scp, ssh = dry_run("setup", *COMMON, "--pdjax", "pdjax==0.1.0")  # nothing built, no wheel copied
    assert scp[5:7] == ["constraints.txt", "pd-run:pdjax-constraints.txt"]
    assert "pip install -q -c ~/pdjax-constraints.txt 'jax[tpu]==0.10.2' pdjax==0.1.0" in ssh[ssh.index("--command") + 1]


def test_train_runs_on_all_workers_with_overrides():
    aot, mkdir, scp, ssh = dry_run(
        "train", *COMMON, "--accelerator", "v5p-32", "--config", "configs/dream7b_planned_v5p.yaml",
        "--", "checkpoint.dir=gs://bucket/pd", "train.steps=1000",
    )
    # first, here: the ahead-of-time compile of the same step for the slice
    assert aot[1:] == ["-m", "pdjax.aot", "train", "--config", "configs/dream7b_planned_v5p.yaml", "--topology",
                       "v5p-32", "checkpoint.dir=gs://bucket/pd", "train.steps=1000"]
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


# ---- every documented example runs as written under --dry-run; --dry-run anywhere never runs gcloud ----------


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that records that it ran: dry runs must leave no record."""
    bin_dir, record = tmp_path / "bin", tmp_path / "gcloud_ran"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, record


def _launch(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)


def _examples(text: str) -> list[list[str]]:
    """`python launch/tpu.py ...` command lines in `text` (backslash continuations joined, # comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip().startswith("python launch/tpu.py")]
    return [shlex.split(line, comments=True)[2:] for line in lines]


def _help_examples() -> list[list[str]]:
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), "--help"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return _examples(done.stdout.split("Examples:", 1)[1])


def _docs_examples() -> list[list[str]]:
    """The examples of the TPU workflow page (the README links to it)."""
    return _examples((ROOT / "docs" / "tpu.md").read_text(encoding="utf-8"))


def test_the_examples_are_found():
    steps = {argv[0] for argv in _help_examples()}
    assert steps == {"create", "setup", "train", "logs", "delete"}
    assert {argv[0] for argv in _docs_examples()} == {"create", "setup", "data", "train", "logs", "delete"}


@pytest.mark.parametrize("source", ["help", "docs/tpu.md"])
def test_every_example_runs_under_dry_run(source, fake_gcloud):
    env, record = fake_gcloud
    examples = _help_examples() if source == "help" else _docs_examples()
    for argv in examples:
        line = argv if "--dry-run" in argv else [*argv, "--dry-run"]  # appended: after `--` for train
        done = _launch(line, env)
        assert done.returncode == 0, f"{shlex.join(line)}\n{done.stderr}"
        assert done.stdout.strip(), shlex.join(line)  # the commands it would run
    assert not record.exists(), record.read_text()


def test_dry_run_after_double_dash_is_not_passed_to_training_and_runs_nothing(fake_gcloud):
    env, record = fake_gcloud
    done = _launch(["train", "--name", "pd", "--zone", "us-east5-a", "--accelerator", "v5p-32", "--config",
                    "configs/dream7b_planned_v5p.yaml", "--", "steps=10", "--dry-run"], env)
    assert done.returncode == 0, done.stderr
    assert not record.exists()
    remote = shlex.split(done.stdout.splitlines()[-1])[-1]
    assert "python -m pdjax.train --config configs/dream7b_planned_v5p.yaml steps=10 >" in remote
    assert "dry" not in remote


def test_train_stops_before_the_slice_when_the_step_does_not_fit(fake_gcloud, tmp_path):
    """A failing `pdjax.aot train` (a fake one here: exit 1) starts nothing on the slice; --skip_aot_check skips it."""
    env, record = fake_gcloud
    fake = tmp_path / "fake_python"
    fake.mkdir()
    (fake / "pdjax").mkdir()
    (fake / "pdjax" / "__init__.py").write_text("")
    (fake / "pdjax" / "aot").mkdir()
    (fake / "pdjax" / "aot" / "__init__.py").write_text("")
    (fake / "pdjax" / "aot" / "__main__.py").write_text("import sys; print('does not fit', file=sys.stderr); sys.exit(1)")
    argv = ["train", "--name", "pd", "--zone", "us-east5-a", "--accelerator", "v5p-32", "--config",
            "configs/dream7b_planned_v5p.yaml"]
    # run from elsewhere, so that `python -m pdjax.aot` finds the fake before this checkout
    launch = lambda a: subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), *a], capture_output=True,  # noqa: E731
                                      text=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(fake)}, timeout=60)
    done = launch(argv)
    assert done.returncode == 2 and "does not fit on v5p-32" in done.stderr.strip().splitlines()[-1], done.stderr
    assert not record.exists()  # no gcloud command ran
    done = launch([*argv, "--skip_aot_check"])
    assert done.returncode == 0, done.stderr
    assert "pdjax.train" in record.read_text()


def test_without_dry_run_gcloud_runs(fake_gcloud):
    """The fake gcloud sees real runs (so the dry-run tests above can fail)."""
    env, record = fake_gcloud
    done = _launch(["delete", "--name", "pd", "--zone", "us-east5-a"], env)
    assert done.returncode == 0, done.stderr
    assert record.read_text().split() == ["compute", "tpus", "tpu-vm", "delete", "pd", "--zone=us-east5-a", "--quiet"]


# Cloud TPU's documented slice types; hosts = chips / 4 beyond one VM (v4/v5p: 4 chips per VM, v5e/v6e: up to 8).
@pytest.mark.parametrize(("accel", "hosts"), [
    ("v4-8", 1), ("v4-16", 2), ("v4-384", 48), ("v4-4096", 512),
    ("v5p-8", 1), ("v5p-16", 2), ("v5p-32", 4), ("v5p-64", 8), ("v5p-128", 16), ("v5p-384", 48), ("v5p-12288", 1536),
    ("v5litepod-1", 1), ("v5litepod-4", 1), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-256", 64),
    ("v6e-1", 1), ("v6e-8", 1), ("v6e-16", 4), ("v6e-256", 64),
])
def test_real_accelerator_types_and_their_hosts(accel, hosts):
    assert _tpu_module().parse_accelerator(accel)[1] == hosts


def _tpu_module():
    """launch/tpu.py imported as a module (it is a script, not part of the package)."""
    if "pdjax_launch_tpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pdjax_launch_tpu", ROOT / "launch" / "tpu.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["pdjax_launch_tpu"]


@pytest.mark.parametrize(("accel", "message"), [
    ("v5p-31", "'v5p-31' is not a Cloud TPU slice: v5p-N counts TensorCores"),
    ("v5p-4", "'v5p-4' is not a Cloud TPU slice"),
    ("v5p-200", "'v5p-200' is not a Cloud TPU slice"),
    ("v5p-12416", "'v5p-12416' is not a Cloud TPU slice"),
    ("v4-12", "'v4-12' is not a Cloud TPU slice"),
    ("v6e-2", "'v6e-2' is not a Cloud TPU slice: v6e-N counts chips"),
    ("v5litepod-512", "'v5litepod-512' is not a Cloud TPU slice"),
    ("v5e-8", "gcloud calls it v5litepod-8"),
    ("v5p", "is not of the form <type>-<size>"),
    ("v5p-x", "is not of the form <type>-<size>"),
])
def test_invalid_accelerator_types_are_one_line_errors(accel, message, fake_gcloud):
    env, record = fake_gcloud
    for step in ("create", "setup"):  # required for create, optional (but checked) for setup
        done = _launch([step, "--name", "pd", "--zone", "z", "--accelerator", accel], env)
        assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr
        assert "Traceback" not in done.stderr
    assert not record.exists()
