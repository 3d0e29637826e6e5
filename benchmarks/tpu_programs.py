"""Compile pdjax's programs for Cloud TPU slices with libtpu (no TPU needed) and tabulate what the compiler says.

Two tables, each from `python -m pdjax.aot ... --json` runs made by this script in one go:

- ``--table attention``: the Dream-7B train step of each TPU config with ``attention_impl`` xla and
  pallas_tpu, at 2,048 and 8,192 tokens a row: per-chip compiled memory beside `pdjax.memory`'s estimate, and
  the compiler's cost
  estimate (flops, bytes accessed, optimal seconds; a scan over layers is counted once, so these
  are one layer's worth plus what is outside the scan: compare impls, not absolute step times).
- ``--table decoders``: Dream-7B's pd / ar / diffusion decoders (and the serving program) on one chip:
  compiled memory beside weights + KV cache and `pdjax.memory`'s estimate, and the compile time.

    python benchmarks/tpu_programs.py --table attention
    python benchmarks/tpu_programs.py --table decoders --topology v6e-1 --batch_size 8 --max_length 2048

Compiling one Dream-7B program takes minutes on 2 CPU cores; a table is 4-8 of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
CONFIGS = {"configs/dream7b_planned_v5p.yaml": "v5p-32", "configs/dream7b_planned_v6e_lora.yaml": "v6e-8"}


def aot(*args: str) -> dict:
    """One `python -m pdjax.aot ... --json` run; its report (a program that does not fit reports so)."""
    proc = subprocess.run([sys.executable, "-m", "pdjax.aot", *args, "--json"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"pdjax.aot {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def attention_table(lengths: list[int]) -> None:
    rows = []
    for config, slice_ in CONFIGS.items():
        for length in lengths:
            reports = {}
            for impl in ("xla", "pallas_tpu"):
                print(f"compiling {config} on {slice_}, rows of {length}, attention {impl} ...", file=sys.stderr, flush=True)
                reports[impl] = aot("train", "--config", config, "--topology", slice_, f"model.attention_impl={impl}",
                                    f"data.row_length={length}")
            rows.append((config, slice_, length, reports))
    print(f"{'config':<36} {'slice':<7} {'row':>5} {'attention':<10} {'GiB/chip':>8} {'estimate':>8} {'fits':>5} "
          f"{'GFLOP':>9} {'GB accessed':>11} {'optimal ms':>10} {'compile s':>9}")
    for config, slice_, length, reports in rows:
        for impl, r in reports.items():
            cost = r.get("cost") or {}
            print(f"{Path(config).name:<36} {slice_:<7} {length:>5} {impl:<10} {gib(r['total_bytes']):>8} "
                  f"{gib(r['estimate_bytes']):>8} "
                  f"{'yes' if r['fits'] else 'no':>5} {cost.get('flops', 0) / 1e9:>9.1f} "
                  f"{cost.get('bytes_accessed', 0) / 1e9:>11.2f} {cost.get('optimal_seconds', 0) * 1e3:>10.2f} "
                  f"{r['compile_s']:>9.1f}")
        x, p = reports["xla"], reports["pallas_tpu"]
        if x["total_bytes"] and p["total_bytes"]:
            print(f"{'':<50}pallas_tpu / xla: memory {p['total_bytes'] / x['total_bytes']:.2f}x, "
                  f"bytes accessed {p['cost'].get('bytes_accessed', 0) / max(x['cost'].get('bytes_accessed', 1), 1):.2f}x")


def decoders_table(topology: str, batch: int, max_length: int, buckets: str | None) -> None:
    print(f"Dream-7B bf16 on one chip of {topology}, batch {batch} x {max_length}"
          + (f", buckets {buckets}" if buckets else ", default buckets"))
    print(f"{'program':<16} {'total GiB':>9} {'weights+KV':>10} {'beyond':>7} {'estimate':>8} {'est/compiled':>12} "
          f"{'temporaries':>11} {'code MiB':>8} {'compile s':>9} {'fits':>5}")
    for command, mode in (("decode", "pd"), ("decode", "ar"), ("decode", "diffusion"), ("serve", "pd")):
        extra = ["--buckets", buckets] if buckets else []
        print(f"compiling {command} {mode} ...", file=sys.stderr, flush=True)
        r = aot(command, "--model", "dream_7b", "--topology", topology, "--mode", mode, "--batch_size", str(batch),
                "--max_length", str(max_length), *extra)
        base = r["estimate_terms"]["weights"] + r["estimate_terms"]["KV cache"]
        total = r["total_bytes"]
        print(f"{command + ' ' + mode:<16} {gib(total):>9} {gib(base):>10} {gib(total - base if total else None):>7} "
              f"{gib(r['estimate_bytes']):>8} {r['estimate_bytes'] / total if total else 0:>12.3f} "
              f"{gib(r['terms']['temporaries'] if r['terms'] else None):>11} "
              f"{(r['terms']['code'] if r['terms'] else 0) / 2**20:>8.1f} {r['compile_s']:>9.1f} "
              f"{'yes' if r['fits'] else 'no':>5}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=("attention", "decoders"), required=True)
    p.add_argument("--lengths", default="2048,8192", help="attention: row lengths (tokens)")
    p.add_argument("--topology", default="v6e-1", help="decoders: the slice (one chip of it is used)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--buckets", default=None, help="decoders: call widths (default: the decoder's)")
    args = p.parse_args()
    if args.table == "attention":
        attention_table([int(x) for x in args.lengths.split(",")])
    else:
        decoders_table(args.topology, args.batch_size, args.max_length, args.buckets)


if __name__ == "__main__":
    main()
