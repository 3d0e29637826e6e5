"""Load on `python -m pdjax.serve` over loopback: continuous batching (one or two replicas) vs static batches vs batch-1, PD vs AR.

For each configuration this starts the real server on 127.0.0.1 (a free port)
with a shipped model, sends the same requests (held-out prompts, greedy) from
`--clients` concurrent `openai` clients, and measures answers/s and completion
tokens/s over the whole run, and the p50 / p99 request latency (sent to
answered, queueing included). Bounded: a fixed number of requests, a timeout on
every request, each server stopped with SIGTERM. Prints one table.

    python benchmarks/serve_load.py                      # docs/performance.md's table (a few minutes on 2 CPU cores)
    python benchmarks/serve_load.py --requests 32 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "pdjax" / "assets" / "default_model"

# (label, model folder, mode, batching, batch size: None = the mode's --pd_batch / --ar_batch, replicas)
CONFIGS = [
    ("PD continuous", "pd", "pd", "continuous", None, 1),
    ("PD continuous, 2 replicas", "pd", "pd", "continuous", None, 2),
    ("PD static batches", "pd", "pd", "static", None, 1),
    ("PD batch-1 one at a time", "pd", "pd", "continuous", 1, 1),
    ("AR continuous", "ar", "ar", "continuous", None, 1),
    ("AR continuous, 2 replicas", "ar", "ar", "continuous", None, 2),
    ("AR static batches", "ar", "ar", "static", None, 1),
    ("AR batch-1 one at a time", "ar", "ar", "continuous", 1, 1),
]


def start(model: str, mode: str, batching: str, batch: int, replicas: int,
          args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """The server as a subprocess (`replicas` of `batch` slots each); returns it and its base URL once it listens."""
    cmd = [sys.executable, "-m", "pdjax.serve", "--model", str(MODELS / model), "--served_model_name", model,
           "--mode", mode, "--port", "0", "--batch_size", str(batch), "--replicas", str(replicas),
           "--batching", batching, "--max_length",
           str(args.max_length), "--chunk", str(args.chunk), "--max_queue", str(args.requests)]
    if args.compilation_cache:
        cmd += ["--compilation_cache", args.compilation_cache]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            print("   ", line.rstrip(), flush=True)
            if "serving http://" in line:
                url.append(line.split("serving ")[1].split(" ")[0])
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(args.start_timeout) or not url:
        proc.kill()
        raise SystemExit(f"the server for {model}/{mode} did not start within {args.start_timeout} s")
    return proc, url[0]


async def load(url: str, model: str, prompts: list[str], clients: int, timeout: float) -> dict:
    """Every prompt once, at most `clients` in flight; latencies and token counts."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=timeout)
    gate = asyncio.Semaphore(clients)
    latencies: list[float] = []
    tokens: list[int] = []
    calls: list[int] = []

    async def one(prompt: str) -> None:
        async with gate:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                     temperature=0)
            latencies.append(time.perf_counter() - t0)
            tokens.append(r.usage.completion_tokens)
            calls.append(r.model_extra["pdjax"]["model_calls"])

    # one request first, outside the clock: the server's first request pays one-off host work
    await one(prompts[0])
    latencies.clear(), tokens.clear(), calls.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - t0
    await client.close()
    lat = np.asarray(latencies)
    return {"answers": len(lat), "wall": wall, "answers_s": len(lat) / wall, "tokens_s": sum(tokens) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "calls": float(np.mean(calls)), "tokens": float(np.mean(tokens))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=192, help="requests per configuration (default: 192)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    p.add_argument("--max_length", type=int, default=128, help="server --max_length (default: 128)")
    p.add_argument("--chunk", type=int, default=16, help="server --chunk (default: 16)")
    p.add_argument("--pd_batch", type=int, default=8, help="slots of the batched PD servers (default: 8)")
    p.add_argument("--ar_batch", type=int, default=16,
                   help="slots of the batched AR servers (default: 16: an AR step is one column per row, so more "
                        "rows share a call before it becomes compute-bound)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--start_timeout", type=float, default=600.0, help="seconds for a server to start (default: 600)")
    p.add_argument("--compilation_cache", default=None, help="JAX's persistent compilation cache for the servers")
    p.add_argument("--modes", default="pd,ar", help="which models to load: pd, ar or both (default: pd,ar)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()

    heldout = [json.loads(line)["prompt"] for line in (MODELS / "pd" / "heldout.jsonl").read_text().splitlines()]
    prompts = [heldout[i % len(heldout)] for i in range(args.requests)]
    rows = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"pd", "ar"}:
        p.error(f"--modes takes pd, ar or pd,ar; got {args.modes!r}")
    for label, model, mode, batching, batch, replicas in CONFIGS:
        if mode not in modes:
            continue
        batch = batch or (args.pd_batch if mode == "pd" else args.ar_batch)
        batch //= replicas  # the same slots in all, split over the replicas
        print(f"== {label}: --model {model} --mode {mode} --batching {batching} --batch_size {batch} "
              f"--replicas {replicas}", flush=True)
        proc, url = start(model, mode, batching, batch, replicas, args)
        try:
            row = asyncio.run(load(url, model, prompts, args.clients, args.timeout))
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        if code != 0:
            raise SystemExit(f"the server for {label} exited {code}")
        rows.append({"config": label, "batch": f"{replicas}x{batch}" if replicas > 1 else str(batch), **row})
        print(f"   {row['answers']} answers in {row['wall']:.1f} s", flush=True)

    print(f"\n{args.requests} requests (held-out prompts, greedy), {args.clients} concurrent openai clients, "
          f"loopback, max_length {args.max_length}, chunk {args.chunk}")
    head = f"{'configuration':<26} {'slots':>5} {'answers/s':>10} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} " \
           f"{'calls/answer':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<26} {r['batch']:>5} {r['answers_s']:>10.2f} {r['tokens_s']:>9.1f} {r['p50']:>7.2f} "
              f"{r['p99']:>7.2f} {r['calls']:>12.1f}")
    by = {r["config"]: r for r in rows}
    for kind in [m.upper() for m in modes]:
        one = by[f"{kind} batch-1 one at a time"]["answers_s"]
        print(f"{kind}: continuous batching answers {by[f'{kind} continuous']['answers_s'] / one:.2f}x as many "
              f"requests per second as batch-1, {by[f'{kind} continuous, 2 replicas']['answers_s'] / one:.2f}x with "
              f"2 replicas")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
