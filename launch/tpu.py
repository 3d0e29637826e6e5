#!/usr/bin/env python3
"""Create a Cloud TPU VM (or multi-host slice), install pdjax on every worker, train, stream logs, tear down.

Every step is one or more `gcloud` commands; `--dry-run` (anywhere on the line, also
after `--`) prints them instead of running them. Multi-host slices run the same command on all workers
(`--worker=all`); `python -m pdjax.train` calls `jax.distributed.initialize()`
there, and each host reads its own shard of the data. Checkpoints go wherever
the training config's checkpoint directory points (a `gs://` bucket on slices).

Examples:
    python launch/tpu.py create --name pd --zone us-east5-a --accelerator v5p-32 --dry-run
    python launch/tpu.py setup  --name pd --zone us-east5-a --accelerator v5p-32
    python launch/tpu.py train  --name pd --zone us-east5-a --accelerator v5p-32 \\
        --config configs/dream7b_planned_v5p.yaml -- checkpoint.dir=gs://my-bucket/pd-run
    python launch/tpu.py logs   --name pd --zone us-east5-a
    python launch/tpu.py delete --name pd --zone us-east5-a
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import tomllib

WHEEL_DIR = "dist"
REPO = pathlib.Path(__file__).resolve().parent.parent
# The versions CI ran (scripts/constraints.py writes it); every worker installs under it, so gets exactly these.
CONSTRAINTS = "constraints.txt"
REMOTE_CONSTRAINTS = "pdjax-constraints.txt"
sys.path.insert(0, str(REPO))  # for pdjax.cli_errors and pdjax.aot.topology (standard library only: no JAX here)
from pdjax.aot.topology import AcceleratorError, accelerator_type, parse_accelerator  # noqa: E402, F401
from pdjax.cli_errors import UserError, cli_main  # noqa: E402


def _version() -> str:
    """pdjax's version, read from this checkout's pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def pinned(package: str) -> str:
    """The version constraints.txt pins for `package` (names compared as pip does: case, `_`, `.` and `-` alike)."""
    key = package.lower().replace("_", "-").replace(".", "-")
    for line in (REPO / CONSTRAINTS).read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and name.strip().lower().replace("_", "-").replace(".", "-") == key:
            return version.strip()
    raise UserError(f"{CONSTRAINTS} pins no {package}: regenerate it with python scripts/constraints.py")


class Runner:
    """Runs (or, in dry-run mode, prints) shell commands."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, argv: list[str]) -> None:
        line = shlex.join(argv)
        if self.dry_run:
            print(line)
            return
        print(f"+ {line}", file=sys.stderr, flush=True)
        rc = subprocess.call(argv)
        if rc:
            raise SystemExit(f"error: command failed with exit code {rc}: {line}")


def _base(args: argparse.Namespace) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm"]


def _where(args: argparse.Namespace) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


def _ssh_all(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return _base(args) + ["ssh", args.name, *_where(args), f"--worker={worker}", "--command", command]


def cmd_create(args: argparse.Namespace, run: Runner) -> None:
    gen, hosts = parse_accelerator(args.accelerator)
    argv = _base(args) + ["create", args.name, *_where(args), f"--accelerator-type={args.accelerator}"]
    argv.append(f"--version={args.runtime or gen.runtime}")
    if args.spot:
        argv.append("--spot")
    run(argv)
    print(f"# {args.accelerator}: {hosts} host(s)", file=sys.stderr)


def cmd_setup(args: argparse.Namespace, run: Runner) -> None:
    pdjax = args.pdjax
    if pdjax is None:  # build a wheel of this checkout and copy it to every worker
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", WHEEL_DIR, str(REPO)])
        wheel = f"pdjax-{_version()}-py3-none-any.whl"
        run(_base(args) + ["scp", f"{WHEEL_DIR}/{wheel}", f"{args.name}:{wheel}", *_where(args), "--worker=all"])
        pdjax = f"~/{wheel}"
    # every package pip installs (jax's tpu extra and pdjax's dependencies) at the version CI ran
    run(_base(args) + ["scp", CONSTRAINTS, f"{args.name}:{REMOTE_CONSTRAINTS}", *_where(args), "--worker=all"])
    packages = " ".join([shlex.quote(f"jax[tpu]=={pinned('jax')}"), pdjax])
    script = (
        "set -e; python3 -m venv ~/pdjax-venv && . ~/pdjax-venv/bin/activate && "
        "pip install -q -U pip && "
        f"pip install -q -c ~/{REMOTE_CONSTRAINTS} {packages}"
        + (" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html" if args.libtpu_index else "")
        + " && python -c 'import jax; print(jax.process_index(), jax.device_count())'"
    )
    run(_ssh_all(args, script))


def cmd_data(args: argparse.Namespace, run: Runner) -> None:
    run(_ssh_all(args, f"mkdir -p $(dirname {shlex.quote(args.dst)}) && gcloud storage cp -r {shlex.quote(args.src)} {shlex.quote(args.dst)}"))


def aot_check(args: argparse.Namespace) -> list[str]:
    """The ahead-of-time check of the slice's train step: `python -m pdjax.aot train` run here, before the slice."""
    return [sys.executable, "-m", "pdjax.aot", "train", "--config", args.config, "--topology", args.accelerator,
            *args.overrides]


def cmd_train(args: argparse.Namespace, run: Runner) -> None:
    gen, hosts = parse_accelerator(args.accelerator)
    if not args.skip_aot_check:
        check = aot_check(args)
        if run.dry_run:
            print(shlex.join(check))
        else:
            print(f"+ {shlex.join(check)}  # compiles the step for {args.accelerator} here (minutes for a 7B model)",
                  file=sys.stderr, flush=True)
            rc = subprocess.call(check)
            if rc:
                why = "does not fit" if rc == 1 else "could not be checked"
                raise UserError(f"the train step {why} on {args.accelerator} (python -m pdjax.aot train, above); "
                                "nothing was started on the slice (--skip_aot_check launches without the check)")
    overrides = " ".join(shlex.quote(o) for o in args.overrides)
    train = f"python -m pdjax.train --config {shlex.quote(args.config)}" + (f" {overrides}" if overrides else "")
    command = (
        f". ~/pdjax-venv/bin/activate && cd ~ && "
        f"nohup {train} > {shlex.quote(args.log)} 2>&1 &"
    )
    if args.config.startswith("configs/"):  # configs ship in the repo, not the wheel: copy them first
        run(_ssh_all(args, f"mkdir -p ~/{shlex.quote(os.path.dirname(args.config))}"))  # scp needs the folder
        run(_base(args) + ["scp", args.config, f"{args.name}:{args.config}", *_where(args), "--worker=all"])
    run(_ssh_all(args, command))
    print(f"# started on {hosts} host(s); follow with: launch/tpu.py logs --name {args.name} --zone {args.zone}", file=sys.stderr)


def cmd_logs(args: argparse.Namespace, run: Runner) -> None:
    run(_ssh_all(args, f"tail -n 200 -f {shlex.quote(args.log)}", worker=str(args.worker)))


def cmd_delete(args: argparse.Namespace, run: Runner) -> None:
    run(_base(args) + ["delete", args.name, *_where(args), "--quiet"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)

    def common(sp: argparse.ArgumentParser, accelerator: bool = False) -> None:
        sp.add_argument("--name", required=True, help="TPU VM / slice name")
        sp.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)")
        sp.add_argument("--project", default=None, help="GCP project (default: gcloud's configured project)")
        sp.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the gcloud commands instead of running them (anywhere on the line, also after --)")
        sp.add_argument("--accelerator", type=accelerator_type, required=accelerator,
                        help="v4-N, v5p-N (N TensorCores), v5litepod-N (v5e), v6e-N (N chips)"
                        + ("" if accelerator else "; optional here, checked when given"))

    sp = sub.add_parser("create", help="create the TPU VM or slice")
    common(sp, accelerator=True)
    sp.add_argument("--runtime", default=None, help="TPU runtime version (default: the generation's v2-alpha image)")
    sp.add_argument("--spot", action="store_true", help="request Spot capacity")
    sp.set_defaults(fn=cmd_create)

    sp = sub.add_parser("setup", help="install pdjax and jax[tpu] on every worker, at constraints.txt's versions")
    common(sp)
    sp.add_argument(
        "--pdjax", default=None, help="pip spec for pdjax on the workers (default: a wheel built from this checkout and copied over)"
    )
    sp.add_argument("--libtpu-index", action="store_true", help="also search Google's libtpu release index")
    sp.set_defaults(fn=cmd_setup)

    sp = sub.add_parser("data", help="copy data from GCS to every worker")
    common(sp)
    sp.add_argument("--src", required=True, help="gs://bucket/path")
    sp.add_argument("--dst", required=True, help="path on the workers")
    sp.set_defaults(fn=cmd_data)

    sp = sub.add_parser("train", help="run python -m pdjax.train on all workers (background, logged)")
    common(sp, accelerator=True)
    sp.add_argument("--config", required=True, help="training YAML (configs/... is copied to the workers)")
    sp.add_argument("--log", default="pdjax-train.log", help="log file on each worker")
    sp.add_argument("--skip_aot_check", action="store_true",
                    help="launch without first compiling the step for the slice here (python -m pdjax.aot train)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides for pdjax.train (after --)")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("logs", help="stream a worker's training log")
    common(sp)
    sp.add_argument("--worker", default=0, type=int, help="which worker's log (0 is the coordinator)")
    sp.add_argument("--log", default="pdjax-train.log")
    sp.set_defaults(fn=cmd_logs)

    sp = sub.add_parser("delete", help="delete the TPU VM or slice")
    common(sp)
    sp.set_defaults(fn=cmd_delete)
    return p


DRY_RUN_FLAGS = ("--dry-run", "--dry_run")


@cli_main("launch/tpu.py")
def main(argv: list[str] | None = None) -> None:
    """Run one step; ``--dry-run`` anywhere in argv (also among the overrides after ``--``) only prints."""
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = any(a in DRY_RUN_FLAGS for a in argv)
    args = build_parser().parse_args([a for a in argv if a not in DRY_RUN_FLAGS])
    args.fn(args, Runner(dry_run))


if __name__ == "__main__":
    sys.exit(main())
