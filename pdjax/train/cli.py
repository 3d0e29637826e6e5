"""`python -m pdjax.train --config configs/NAME.yaml [--resume] [key=value ...]`: train, resume or export.

A thin shell over `pdjax.train.trainer`: it parses flags and overrides, starts
`jax.distributed` on multi-host launches before anything else touches JAX,
and prints only on the first host.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import signal
import sys
import threading
from typing import Any, Sequence

from pdjax import compile_cache
from pdjax.cli_errors import UserError, cli_main
from pdjax.train.config import config_dict, load_config
from pdjax.train.overrides import ConfigError

EPILOG = """\
overrides are dotted config keys, e.g.  steps=2000 optimizer.learning_rate=2e-5 data.mode=dense mesh.fsdp=-1
an unknown key is an error that lists the closest valid keys.

SIGTERM (preemption) or Ctrl-C: the step in flight finishes (on every host, at one agreed step), is
checkpointed with the data position, and the command that resumes is printed; exit status 0.
A second signal aborts at once, keeping the last complete checkpoint.

examples:
  python -m pdjax.train --config configs/tiny_cpu.yaml
  python -m pdjax.train --config configs/tiny_cpu.yaml --resume steps=600
  python -m pdjax.train --config configs/tiny_cpu.yaml --export runs/tiny_cpu/hf-100 --step 100
"""


def build_parser() -> argparse.ArgumentParser:
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
    compile_cache.add_flag(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


@cli_main("pdjax.train")
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m pdjax.train` and `pdjax-train`."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"cannot read the config: {e}") from None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_dict(cfg), sort_keys=False), end="")
        return 0
    if args.step is not None and args.export is None:
        p.error("--step goes with --export")

    from pdjax.train.trainer import Trainer, initialize_distributed, train

    initialize_distributed(cfg.distributed)  # before any other JAX call
    compile_cache.enable(disabled=args.no_compilation_cache)
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
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, setup_interrupt) if main_thread else None
    try:
        trainer = train(cfg, resume=args.resume, log=log)
    except KeyboardInterrupt:  # Ctrl-C outside the loop (setup, export): the loop's own handlers were not in place
        if log:
            log("interrupted outside the training loop: nothing to save, checkpoints are as they were")
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    stopped = trainer.stopped
    if stopped is not None and log:
        if stopped.checkpoint_dir is None:
            log(f"stopped by {stopped.reason} at step {stopped.step}; nothing saved (set checkpoint.dir to resume runs)")
        else:
            log(f"stopped by {stopped.reason} at step {stopped.step}, saved to {stopped.checkpoint_dir}; resume with:")
            log("  " + resume_command(sys.argv[1:] if argv is None else argv))
    return 0


def setup_interrupt(signum: int, frame: Any) -> None:
    """SIGINT before (or after) the training loop: KeyboardInterrupt, as Python's default handler raises it.

    Python raises a signal handler's exception in whatever code runs when the signal is handled. Inside
    a garbage-collector callback (JAX registers one) it prints "Exception ignored" and goes on, and the
    Ctrl-C would be lost. Such a SIGINT is sent again a moment later instead.
    """
    if in_gc_callback(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def in_gc_callback(frame: Any) -> bool:
    """Whether `frame` runs inside one of `gc.callbacks` (at any depth)."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks} - {None}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


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
