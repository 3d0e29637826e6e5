"""`python -m pdjax.train --config configs/NAME.yaml [--resume] [key=value ...]`: train, resume or export.

A thin shell over `pdjax.train.trainer`: it parses flags and overrides, starts
`jax.distributed` on multi-host launches before anything else touches JAX,
and prints only on the first host.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from pdjax.train.config import config_dict, load_config
from pdjax.train.overrides import ConfigError

EPILOG = """\
overrides are dotted config keys, e.g.  steps=2000 optimizer.learning_rate=2e-5 data.mode=dense mesh.fsdp=-1
an unknown key is an error that lists the closest valid keys.

examples:
  python -m pdjax.train --config configs/tiny_cpu.yaml
  python -m pdjax.train --config configs/tiny_cpu.yaml --resume steps=600
  python -m pdjax.train --config configs/tiny_cpu.yaml --export runs/tiny_cpu/hf-100 --step 100
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pdjax.train",
        description="Train a planned-diffusion (or AR / diffusion baseline) model with the hybrid loss.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="training YAML (configs/*.yaml); without it every key comes from overrides")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    p.add_argument("--export", metavar="DIR", help="write a checkpointed step as a Hugging Face folder and exit")
    p.add_argument("--step", type=int, help="with --export: the step to export (default: the latest)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m pdjax.train` and `pdjax-train`."""
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        p.error(str(e))
    except OSError as e:
        p.error(f"cannot read the config: {e}")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_dict(cfg), sort_keys=False), end="")
        return 0
    if args.step is not None and args.export is None:
        p.error("--step goes with --export")

    from pdjax.train.trainer import Trainer, initialize_distributed, train

    initialize_distributed(cfg.distributed)  # before any other JAX call
    import jax

    log = print if jax.process_index() == 0 else None
    if args.export is not None:
        if cfg.checkpoint.dir is None:
            p.error("--export reads checkpoints: set checkpoint.dir")
        trainer = Trainer.create(cfg, resume=True, restore_step=args.step, with_data=False, log=log)
        try:
            names = trainer.export(args.export)
        finally:
            trainer.close()
        if log:
            log(f"exported step {int(trainer.state.step)} ({len(names)} weight file(s)) to {args.export}")
        return 0
    try:
        trainer = train(cfg, resume=args.resume, log=log)
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handlers were in place: nothing to save yet
        if log:
            log("interrupted before training started: nothing to save")
        return 130
    stopped = trainer.stopped
    if stopped is not None and log:
        if stopped.checkpoint_dir is None:
            log(f"stopped by {stopped.reason} at step {stopped.step}; nothing saved (set checkpoint.dir to resume runs)")
        else:
            log(f"stopped by {stopped.reason} at step {stopped.step}, saved to {stopped.checkpoint_dir}; resume with:")
            log("  " + resume_command(sys.argv[1:] if argv is None else argv))
    return 0


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same flags and overrides, with --resume."""
    args = list(argv)
    if "--resume" not in args:
        at, i = len(args), 0
        while i < len(args):  # before the first override, after the flags (and their values)
            if args[i] in _VALUED:
                i += 2
                continue
            if not args[i].startswith("-"):
                at = i
                break
            i += 1
        args.insert(at, "--resume")
    return shlex.join(["python", "-m", "pdjax.train", *args])


_VALUED = ("--config", "--export", "--step")  # flags followed by a separate value


if __name__ == "__main__":
    sys.exit(main())
