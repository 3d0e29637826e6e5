"""Where serving throughput comes from on this machine: the serving engine without HTTP, batch-1 vs batched.

`benchmarks/serve_load.py` measures the whole server through the `openai` client. This script
measures the same engine (`pdjax.serve.engine.Engine`, the shipped models, greedy held-out
prompts) in-process, so the HTTP layer's cost is out of the picture, and also reports how many
CPU cores each configuration kept busy (process CPU seconds / wall seconds). Per mode:

- batch-1: one slot, one request at a time (what `--batch_size 1` serves);
- batched: `--batch` slots, every request queued at once (continuous batching);
- two replicas: the batch split over two JAX devices (two engines, one thread each), which on a
  CPU means the host platform forced to 2 devices; one device per replica on a multi-chip host.

    python benchmarks/serve_engine.py                     # PD and AR, 64 prompts each
    python benchmarks/serve_engine.py --modes pd --requests 128 --pd_batch 8
    python benchmarks/serve_engine.py --schedules split,shared   # both iteration schedules, side by side

A second table (``--calls``, on by default) times the bare model call of the shipped PD model (jitted forward
with a KV cache of max_length + 1 slots, best of 3 x 30 calls) at 1 row and at --pd_batch rows, for a plan
step's width (2) and denoising windows (32, 64): per token, a batched call costs what a lone one does when the
device is compute-bound, and batching can only share the narrow calls.
"""

from __future__ import annotations

import os

# two host devices for the two-replica row (set before JAX is imported; the other rows use device 0)
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import argparse
import functools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODELS = ROOT / "pdjax" / "assets" / "default_model"


def build_engine(mode: str, batch: int, device, max_length: int, chunk: int, schedule: str = "auto"):
    """A compiled engine for the shipped `mode` model with `batch` slots on `device`, and its tokenizer."""
    import jax

    from pdjax.decode.cli import build, resolve_model
    from pdjax.serve.engine import Engine

    model = str(MODELS / mode)
    with jax.default_device(device):
        args = argparse.Namespace(model=model, mode=mode, max_length=max_length, batch_size=batch, max_spans=16,
                                  buckets=None, profile=False, device=device)
        decoder, tokenizer, _ = build(args, resolve_model(model, mode))
        engine = Engine(decoder, chunk=chunk, max_queue=100_000, schedule=schedule)
        engine.warmup()
    return engine, tokenizer


def call_costs(batch: int, max_length: int, widths: tuple[int, ...] = (2, 32, 64)) -> list[dict]:
    """Best-of-3 wall time of the shipped PD model's jitted forward with a KV cache, at 1 and `batch` rows."""
    import jax
    import jax.numpy as jnp

    from pdjax.decode.cli import build, resolve_model
    from pdjax.decode.forward import full_logits
    from pdjax.structure import NEVER, Role, Segments

    model = str(MODELS / "pd")
    args = argparse.Namespace(model=model, mode="pd", max_length=max_length, batch_size=1, max_spans=16,
                              buckets=None, profile=False, device=None)
    forward = build(args, resolve_model(model, "pd"))[0].forward
    apply = jax.jit(functools.partial(full_logits, forward))  # the forward and the logits of every position
    out = []
    for rows in (1, batch):
        cache = forward.make_cache(rows, max_length + 1)
        for width in widths:
            ones = jnp.ones((rows, width), jnp.int32)
            position = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width))
            segments = Segments(block_id=ones, visible_from=jnp.full((rows, width), NEVER, jnp.int32),
                                position=position, doc_id=ones, role=ones * int(Role.SPAN))
            jax.block_until_ready(apply(forward.params, ones, segments, cache))
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(30):
                    result = apply(forward.params, ones, segments, cache)
                jax.block_until_ready(result)
                best = min(best, (time.perf_counter() - t0) / 30)
            out.append({"rows": rows, "width": width, "ms": 1000 * best, "us_per_token": 1e6 * best / (rows * width)})
    return out


def serve(engines: list, devices: list, prompts: list[list[int]], options) -> tuple[float, float, list]:
    """Answer every prompt (split round-robin over the engines, one thread each); wall s, CPU s, results."""
    import jax

    parts: list[list] = [[] for _ in engines]

    def run(k: int) -> None:
        engine, items = engines[k], prompts[k::len(engines)]
        with jax.default_device(devices[k]):
            if engine.config.batch_size == 1:
                parts[k].extend(engine.generate([p], options)[0] for p in items)
            else:
                parts[k].extend(engine.generate(items, options))

    t0, c0 = time.perf_counter(), os.times()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, c1 = time.perf_counter() - t0, os.times()
    return wall, (c1.user - c0.user) + (c1.system - c0.system), [r for part in parts for r in part]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="pd,ar", help="pd, ar or pd,ar (default: pd,ar)")
    p.add_argument("--requests", type=int, default=64, help="held-out prompts per configuration (default: 64)")
    p.add_argument("--pd_batch", type=int, default=8, help="PD slots when batched (default: 8)")
    p.add_argument("--ar_batch", type=int, default=16, help="AR slots when batched (default: 16)")
    p.add_argument("--max_length", type=int, default=128, help="the engines' max_length (default: 128)")
    p.add_argument("--chunk", type=int, default=16, help="loop iterations per device call (default: 16)")
    p.add_argument("--schedules", default="auto",
                   help="iteration schedules of the batched rows, comma-separated: auto, split, shared "
                   "(default: auto, i.e. split on a CPU)")
    p.add_argument("--calls", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the bare model call at 1 and --pd_batch rows (default: on)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"pd", "ar"}:
        p.error(f"--modes takes pd, ar or pd,ar; got {args.modes!r}")
    schedules = [x.strip() for x in args.schedules.split(",") if x.strip()]
    from pdjax.decode.slots import SCHEDULES

    if not schedules or set(schedules) - set(SCHEDULES):
        p.error(f"--schedules takes auto, split and/or shared; got {args.schedules!r}")

    import jax

    from pdjax.decode.decoder import DecodeOptions
    from pdjax.model.tokenizer import chat_prompt_ids

    devices = jax.devices()
    options = DecodeOptions(temperature=0.0)
    rows = []
    for mode in modes:
        batch = args.pd_batch if mode == "pd" else args.ar_batch
        heldout = [json.loads(x)["prompt"] for x in (MODELS / mode / "heldout.jsonl").read_text().splitlines()]
        configs = [("batch-1 one at a time", [1], devices[:1], "auto")]
        for schedule in schedules:
            tag = "" if schedule == "auto" else f", {schedule}"
            configs.append((f"batched ({batch} slots{tag})", [batch], devices[:1], schedule))
            if len(devices) >= 2 and batch >= 2:
                configs.append((f"2 replicas x {batch // 2} slots{tag}", [batch // 2, batch - batch // 2], devices[:2],
                                schedule))
        for label, batches, devs, schedule in configs:
            print(f"== {mode.upper()} {label}: compiling ...", flush=True)
            built = [build_engine(mode, b, d, args.max_length, args.chunk, schedule) for b, d in zip(batches, devs)]
            engines, tokenizer = [e for e, _ in built], built[0][1]
            prompts = [chat_prompt_ids(tokenizer, heldout[i % len(heldout)], chat_template=True)
                       for i in range(args.requests)]
            serve(engines, devs, prompts[: 2 * len(engines)], options)  # one-off host work, off the clock
            wall, cpu, results = serve(engines, devs, prompts, options)
            calls = statistics.fmean(r.stats.model_calls for r in results)
            rows.append({"mode": mode.upper(), "config": label, "answers": len(results), "wall": wall,
                         "answers_s": len(results) / wall, "cores": cpu / wall, "calls": calls})
            print(f"   {len(results)} answers in {wall:.2f} s", flush=True)

    print(f"\n{args.requests} held-out prompts per row, greedy, max_length {args.max_length}, chunk {args.chunk}, "
          f"in-process (no HTTP); {os.cpu_count()} CPU cores, JAX platform {jax.default_backend()}")
    head = f"{'mode':<4} {'configuration':<32} {'answers/s':>10} {'x batch-1':>9} {'cores busy':>10} {'calls/answer':>12}"
    print(head)
    print("-" * len(head))
    base = {r["mode"]: r["answers_s"] for r in rows if r["config"].startswith("batch-1")}
    for r in rows:
        ratio = r["answers_s"] / base[r["mode"]] if r["mode"] in base else float("nan")
        print(f"{r['mode']:<4} {r['config']:<32} {r['answers_s']:>10.2f} {ratio:>9.2f} {r['cores']:>10.2f} "
              f"{r['calls']:>12.1f}")
    costs = call_costs(args.pd_batch, args.max_length) if args.calls else []
    if costs:
        lone = {c["width"]: c["ms"] for c in costs if c["rows"] == 1}
        print(f"\nPD model call alone (jitted forward + KV cache of {args.max_length + 1} slots, best of 3 x 30)")
        head = f"{'rows':>4} {'width':>5} {'ms/call':>8} {'us/token':>9} {'x rows-times-lone':>17}"
        print(head)
        print("-" * len(head))
        for c in costs:
            print(f"{c['rows']:>4} {c['width']:>5} {c['ms']:>8.2f} {c['us_per_token']:>9.1f} "
                  f"{c['ms'] / (c['rows'] * lone[c['width']]):>17.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"serving": rows, "calls": costs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
