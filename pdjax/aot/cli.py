"""`python -m pdjax.aot train|decode|serve`: compile a program for a Cloud TPU slice here, before renting it.

libtpu compiles for any TPU topology on a machine without a TPU; the compiled program's per-chip
memory is the compiler's own, so it catches what an estimate misses. Exit status: 0 when the
program fits the chip's HBM, 1 when it does not (one line naming the largest term), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Sequence

from pdjax.aot import topology
from pdjax.cli_errors import DEBUG_ENV, POSITIVE_INT, UserError, buckets_type, cli_main, debug_requested, number_type

EXAMPLES = """\
examples:
  python -m pdjax.aot train --config configs/dream7b_planned_v5p.yaml --topology v5p-32
  python -m pdjax.aot train --config configs/dream7b_planned_v6e_lora.yaml --topology v6e-8 data.row_length=8192
  python -m pdjax.aot decode --model dream_7b --topology v6e-1 --mode pd --batch_size 8 --max_length 2048
  python -m pdjax.aot serve --model dream_7b --topology v6e-1 --batch_size 8 --max_length 2048 --json
"""
_CHILD = "PDJAX_AOT_CHILD"  # set in the process that compiles (see `main`)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pdjax.aot",
        description="Compile a train, decode or serve program for a Cloud TPU slice on this machine (no TPU needed, "
        "libtpu is) and print its per-chip memory beside the chip's HBM and pdjax.memory's estimate.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--topology", required=True, type=topology.accelerator_type,
                        help="a Cloud TPU accelerator type: v4-N, v5p-N (N TensorCores), v5litepod-N, v6e-N (N chips)")
        sp.add_argument("--json", action="store_true", help="print the report as one JSON object")

    t = sub.add_parser("train", help="the step python -m pdjax.train runs for a config, on every chip of the slice",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", required=True, help="training YAML, as for python -m pdjax.train")
    t.add_argument("--model", default=None,
                   help="the model's shape: a preset (dream_7b) or a folder with config.json (default: model.checkpoint's "
                   "config.json, or the config's model.preset when the checkpoint is not on this machine)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for python -m pdjax.train")
    common(t)

    for name, what in (("decode", "python -m pdjax.decode's program (one batch)"),
                       ("serve", "python -m pdjax.serve's program (refill + one chunk over the slots)")):
        d = sub.add_parser(name, help=what + ", on one chip", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        d.add_argument("--model", required=True, help="a preset (dream_7b) or a Hugging Face folder (config.json; its "
                       "tokenizer gives the control ids); no weights are read")
        d.add_argument("--mode", choices=("pd", "ar", "diffusion"), default="pd", help="decoding mode (default: pd)")
        d.add_argument("--batch_size", type=POSITIVE_INT, default=8 if name == "serve" else 1,
                       help="rows decoded together" + (" (slots; default: 8)" if name == "serve" else " (default: 1)"))
        d.add_argument("--max_length", type=number_type(int, 2, what=">= 2"), default=None,
                       help="prompt + response tokens (default: the model's positions, at most 2048)")
        d.add_argument("--max_spans", type=POSITIVE_INT, default=16, help="most promises per plan round (default: 16)")
        d.add_argument("--buckets", type=buckets_type, default=None,
                       help="comma-separated static call widths (default: powers of two from 32)")
        d.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                       help="weights and compute (default: the folder's, or the preset's)")
        d.add_argument("--quantize", choices=("int8", "int4"), default=None,
                       help="weights quantized as pdjax.decode --quantize loads them (default: float weights)")
        if name == "serve":
            d.add_argument("--chunk", type=POSITIVE_INT, default=16, help="loop iterations per device call (default: 16)")
            d.add_argument("--schedule", choices=("auto", "split", "shared"), default="auto",
                           help="how an iteration serves the slots (auto: shared, as on a TPU)")
        common(d)
    return p


@cli_main("pdjax.aot")
def main(argv: Sequence[str] | None = None) -> int:
    """Parse and check the command line, then compile in a fresh process set up for libtpu (see `_compile_here`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train" and not os.path.isfile(args.config):
        raise UserError(f"--config {args.config}: no such file")
    if not topology.libtpu_available():
        raise UserError(f"compiling for a TPU needs libtpu, which is not installed: {topology.LIBTPU_INSTALL}")
    if os.environ.get(_CHILD):
        return _compile_here(args)
    # JAX picks its platform once per process, and a CPU setting (JAX_PLATFORMS, fake devices in XLA_FLAGS)
    # would hide libtpu: compile in a child process with the environment libtpu needs
    env = topology.compile_environment()
    env[_CHILD] = "1"
    if debug_requested(sys.argv):  # run_main took --debug off argv
        env[DEBUG_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pdjax.aot", *argv], env=env).returncode


def _compile_here(args: argparse.Namespace) -> int:
    from pdjax.aot import programs
    from pdjax.aot.report import compile_lowered

    target = topology.target(args.topology)
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    devices = topology.devices(args.topology)
    if args.command == "train":
        from pdjax.train.config import load_config
        from pdjax.train.overrides import ConfigError

        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise UserError(str(e)) from None
        config, source = programs.train_model_config(cfg, args.config, args.overrides, args.model)
        say(f"model: {source}; building the train step of {args.config} for {len(devices)} chips ...")
        lowered, estimate = programs.train_program(cfg, config, devices)
        what = f"train step of {args.config}"
    else:
        model = programs.resolve_model(args.model, args.dtype)
        build = programs.decode_program if args.command == "decode" else programs.serve_program
        extra = {"chunk": args.chunk, "schedule": args.schedule} if args.command == "serve" else {}
        lowered, estimate = build(model, devices[0], mode=args.mode, batch_size=args.batch_size,
                                  max_length=args.max_length, max_spans=args.max_spans, buckets=args.buckets,
                                  quantize=args.quantize, **extra)
        weights = f", {args.quantize} weights" if args.quantize else ""
        what = f"{args.mode} {args.command} program of {model.source} (batch {args.batch_size}{weights})"
    say(f"compiling the {what} for {target.accelerator} ({target.topology}) ...")
    report = compile_lowered(lowered, what, target, estimate)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.table())
    if not report.fits:
        print(f"pdjax.aot: {report.reason()}", file=sys.stderr)
        return 1
    return 0
