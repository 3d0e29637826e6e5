"""The README's first decode, run twice: with a cold and then a warm persistent compilation cache.

Takes the `python -m pdjax.decode ...` command of the README's "Two commands" (read
from README.md, not copied), and runs it as written in fresh processes with a new,
empty cache folder (``XDG_CACHE_HOME`` set to a temporary directory): first with
nothing cached, then again, so the second run reads the decoder from the cache. Each
row is one process: end-to-end wall time (interpreter start, imports, model load,
compile or cache read, decode, printing), and the compile and decode times of the
stats line the command prints.

Run: python benchmarks/cold_warm_decode.py [--warm_runs 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATS = re.compile(r"decode (\d+\.\d+) s(?: \(\+ compile (\d+\.\d+) s\))?")


def readme_decode_command(readme: Path = REPO / "README.md") -> list[str]:
    """argv of the `python -m pdjax.decode` step of the README's first bash block (run with this interpreter)."""
    text = readme.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)\n```", text, re.S)
    if block is None:
        raise SystemExit("README.md has no bash block")
    steps = [s.strip() for s in block.group(1).split("&&")]
    decode = [s for s in steps if s.startswith("python -m pdjax.decode")]
    if not decode:
        raise SystemExit(f"README.md's first command has no python -m pdjax.decode step: {block.group(1)!r}")
    argv = shlex.split(decode[0])
    return [sys.executable, *argv[1:]]


def run_once(argv: list[str], cache_home: str) -> dict[str, float]:
    """One process: end-to-end seconds and the compile / decode seconds of its stats line."""
    env = {**os.environ, "XDG_CACHE_HOME": cache_home, "COLUMNS": "400"}  # one unwrapped stats line
    env.pop("PDJAX_COMPILATION_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"decode failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = STATS.search(" ".join(done.stdout.split()))
    if found is None:
        raise SystemExit(f"no stats line in the output:\n{done.stdout[-2000:]}")
    return {"end_to_end_s": wall, "decode_s": float(found.group(1)), "compile_s": float(found.group(2) or 0.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm_runs", type=int, default=1, help="runs after the cold one (default 1)")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args()
    argv = readme_decode_command()
    print(f"command: {shlex.join(['python', *argv[1:]])}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdjax-cold-warm-") as cache_home:
        for i in range(1 + args.warm_runs):
            rows.append({"run": "cold cache" if i == 0 else f"warm cache ({i})", **run_once(argv, cache_home)})
    print("\n| run | end to end | compile (or cache read) | decode | speed-up vs cold |\n|---|---|---|---|---|")
    cold = rows[0]["end_to_end_s"]
    for r in rows:
        print(f"| {r['run']} | {r['end_to_end_s']:.1f} s | {r['compile_s']:.2f} s | {r['decode_s']:.2f} s | "
              f"{cold / r['end_to_end_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": argv[1:], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
