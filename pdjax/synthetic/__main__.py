"""`python -m pdjax.synthetic --out DIR --seed S --num_train N --num_heldout M [--tasks paper]`: build the default model's data."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pdjax.cli_errors import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, UserError, cli_main
from pdjax.synthetic.dataset import DEFAULT_VOCAB_SIZE, build_dataset
from pdjax.synthetic.generate import DEFAULT_MIX, TASK_SETS, default_mix


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pdjax.synthetic`."""
    p = argparse.ArgumentParser(prog="python -m pdjax.synthetic", description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--num_train", type=POSITIVE_INT, default=20000)
    p.add_argument("--num_heldout", type=NON_NEGATIVE_INT, default=500)
    p.add_argument("--vocab_size", type=POSITIVE_INT, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary incl. the 3 chat specials; the 7 control tokens come on top")
    p.add_argument(
        "--tasks",
        choices=TASK_SETS,
        default="default",
        help="task set: default (the shipped models' data: one short fact per span) or paper "
        "(the paper's shape: 2-4 spans of ~20-50 tokens per round, 2-5 facts each)",
    )
    for shape, weight in DEFAULT_MIX.items():
        p.add_argument(
            f"--{shape}", type=NON_NEGATIVE_FLOAT, default=None,
            help=f"share of {shape} answers (default {weight}; with --tasks paper {default_mix('paper')[shape]})",
        )  # fmt: skip
    p.add_argument(
        "--chatterbot",
        action="store_true",
        help="add plain small-talk answers from the chatterbot-corpus package (BSD-3-Clause; pip install it first)",
    )
    return p


@cli_main("pdjax.synthetic")
def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, build train.jsonl / heldout.jsonl / tokenizer/ / stats.json under --out, print the stats."""
    p = build_parser()
    args = p.parse_args(argv)
    base = default_mix(args.tasks)
    mix = {shape: base[shape] if getattr(args, shape) is None else getattr(args, shape) for shape in DEFAULT_MIX}
    try:  # shares that add up to 0, more distinct questions than the task set can ask
        stats = build_dataset(
            args.out, args.seed, args.num_train, args.num_heldout,
            vocab_size=args.vocab_size, mix=mix, chatterbot=args.chatterbot, tasks=args.tasks,
            log=lambda line: print(line, file=sys.stderr, flush=True),  # stdout is the stats JSON alone
        )  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from None
    json.dump(stats, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
