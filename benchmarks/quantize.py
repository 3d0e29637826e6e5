"""What int8 weights change in the time of the calls that read every weight once: AR steps and plan steps.

An AR step and a PD plan step are one-token calls over the KV cache; they read every weight once, so on a
chip whose matmuls take their weights straight from memory they are bound by the weights' bytes. Three
measurements, each int8 against the checkpoint's (or the preset's) bfloat16 weights, side by side in this run:

1. cpu, shipped models: wall seconds per call of each kind, from the decoder's profiler (`pdjax.eval.heldout.
   per_call_seconds`, batch 1, float32 compute as the model cards), for the shipped AR model's steps and the
   shipped PD model's plan steps, on the first --prompts held-out prompts; --rounds rounds alternate the two
   weight formats and the median is kept.
2. cpu, a Dream-shaped random model of ~0.5B parameters (`CPU_MODEL`, bfloat16 weights), bfloat16 compute (as
   pdjax.decode runs a bf16 checkpoint) and float32 compute: a jitted one-token cached call (an AR step; a plan
   step is the same call), the two weight formats timed alternately, median of --repeats.
3. tpu v5e (compiled by libtpu here, no TPU): the compiler's cost_analysis() of one Dream-7B AR step
   (batch 1, one token, a 2,049-slot cache, logits of that token) and of one 64-wide denoising call (64 tokens,
   their logits), with the layer scan unrolled so that every layer is counted (the decoder's scan counts its
   body once): bytes accessed, flops, and the compiler's optimal seconds.

    python benchmarks/quantize.py [--prompts 8] [--rounds 3] [--repeats 10] [--no_tpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

CPU_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=8, num_heads=16,
                 num_kv_heads=4, head_dim=128)  # ~0.49B parameters: ~1 GB of bfloat16, far beyond the caches
CACHE = 2048
_CHILD = "PDJAX_QUANTIZE_BENCH_TPU"


def shipped_per_call(prompts: int, rounds: int) -> list[dict[str, Any]]:
    """Seconds per AR step (the AR model) and per plan step (the PD model), bf16 vs int8, median over rounds."""
    from pdjax.decode.model_info import default_model_path
    from pdjax.eval.heldout import decode_options, heldout_prompts, load_heldout_model, per_call_seconds

    out = []
    for mode, kind in (("ar", "plan"), ("pd", "plan")):
        folder = default_model_path(mode)
        with open(os.path.join(folder, "heldout.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()][:prompts]
        models = {q: load_heldout_model(folder, mode, heldout_prompts(rows), quantize=q) for q in (None, "int8")}
        seconds: dict[Any, list[float]] = {None: [], "int8": []}
        for _ in range(rounds):
            for q, model in models.items():
                seconds[q].append(per_call_seconds(model, rows, decode_options(mode))[kind]["s_per_call"])
        bf16, int8 = statistics.median(seconds[None]), statistics.median(seconds["int8"])
        row = {"what": f"shipped {mode} model, {'AR step' if mode == 'ar' else 'plan step'}", "bf16_ms": 1e3 * bf16,
               "int8_ms": 1e3 * int8, "ratio": int8 / bf16}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def cpu_step(repeats: int, compute: str) -> dict[str, Any]:
    """A jitted one-token cached call of a random Dream-shaped model, bf16 vs int8 weights, timed alternately;
    `compute` is the activations' dtype (bfloat16: what pdjax.decode runs a bf16 checkpoint in)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pdjax.decode.forward import model_forward
    from pdjax.model import DreamConfig, DreamModel
    from pdjax.model.quantize import quantize_model
    from pdjax.structure import Segments

    config = DreamConfig(**CPU_MODEL, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype=jnp.dtype(compute), param_dtype=jnp.bfloat16)
    model = DreamModel(config, rngs=nnx.Rngs(0))
    forwards = {"bf16": model_forward(model), "int8": model_forward(quantize_model(model, "int8"))}
    del model
    pos = jnp.full((1, 1), CACHE // 2, jnp.int32)
    seg = Segments(jnp.zeros_like(pos), jnp.zeros_like(pos), pos, jnp.ones_like(pos), jnp.ones_like(pos))
    tokens = jnp.ones((1, 1), jnp.int32)
    steps, caches = {}, {}
    for name, fw in forwards.items():
        def step(params, cache, fw=fw):
            hidden, cache = fw.apply(params, tokens, seg, cache)
            return fw.head(params, hidden[:, 0], pos[:, 0], pos[:, 0]), cache

        steps[name] = jax.jit(step, donate_argnums=1)
        caches[name] = jax.jit(lambda fw=fw: fw.make_cache(1, CACHE + 1))()  # its own buffers: donated each step
        logits, caches[name] = steps[name](fw.params, caches[name])  # compile
        logits.block_until_ready()
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(repeats):
        for name, fw in forwards.items():
            t0 = time.perf_counter()
            logits, caches[name] = steps[name](fw.params, caches[name])
            logits.block_until_ready()
            times[name].append(time.perf_counter() - t0)
    bf16, int8 = statistics.median(times["bf16"]), statistics.median(times["int8"])
    row = {"what": f"random Dream-shaped {config.num_params / 1e9:.2f}B model, one-token cached call (AR step = plan "
                   f"step), {compute} compute", "bf16_ms": 1e3 * bf16, "int8_ms": 1e3 * int8, "ratio": int8 / bf16}
    print(json.dumps(row), flush=True)
    return row


def tpu_costs() -> list[dict[str, Any]]:
    """In a libtpu process: cost_analysis() of one Dream-7B AR step and one 64-wide denoising call, bf16 vs int8."""
    import functools

    import jax
    import jax.numpy as jnp

    jax.lax.scan = functools.partial(jax.lax.scan, unroll=True)  # every layer in the cost, not the scan body once
    from pdjax.aot import topology
    from pdjax.aot.programs import abstract_forward
    from pdjax.model import DreamConfig
    from pdjax.structure import Segments

    device = topology.devices("v5litepod-1")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    config = DreamConfig.dream_7b()
    out = []
    for width, what in ((1, "AR step"), (64, "64-wide denoising call")):
        row: dict[str, Any] = {"what": f"Dream-7B {what} (batch 1, {CACHE + 1}-slot cache), v5e"}
        for quantize in (None, "int8"):
            fw = abstract_forward(config, sharding, quantize)
            ints = jax.ShapeDtypeStruct((1, width), jnp.int32, sharding=sharding)
            flat = jax.ShapeDtypeStruct((width,), jnp.int32, sharding=sharding)
            cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                 jax.eval_shape(lambda: fw.make_cache(1, CACHE + 1)))

            def call(params, tokens, seg, cache, row_ids, positions, fw=fw):
                hidden, cache = fw.apply(params, tokens, seg, cache)
                return fw.head(params, hidden.reshape(-1, hidden.shape[-1]), row_ids, positions), cache

            t0 = time.perf_counter()
            compiled = jax.jit(call, donate_argnums=3).lower(fw.params, ints, Segments(*(ints,) * 5), cache, flat,
                                                             flat).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            name = quantize or "bf16"
            row[f"{name}_bytes_accessed"] = float(cost["bytes accessed"])
            row[f"{name}_flops"] = float(cost["flops"])
            row[f"{name}_optimal_s"] = float(cost.get("optimal_seconds", float("nan")))
            row[f"{name}_compile_s"] = round(time.perf_counter() - t0, 1)
        row["bytes_ratio"] = row["int8_bytes_accessed"] / row["bf16_bytes_accessed"]
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three measurements (the TPU one in a child process set up for libtpu) and print their rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts profiled per shipped model")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the shipped models' profile")
    p.add_argument("--repeats", type=int, default=10, help="timed steps of the random model, per weight format")
    p.add_argument("--no_tpu", action="store_true", help="skip the TPU cost (libtpu compiles, minutes)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.environ.get(_CHILD):
        print("TPU-ROWS " + json.dumps(tpu_costs()), flush=True)
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "cpu": shipped_per_call(args.prompts, args.rounds)
            + [cpu_step(args.repeats, compute) for compute in ("bfloat16", "float32")]}
    if not args.no_tpu:
        from pdjax.aot import topology

        env = topology.compile_environment()
        env[_CHILD] = "1"
        proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows["tpu"] = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("TPU-ROWS "))[9:])
        for row in rows["tpu"]:
            print(json.dumps(row))
    print(f"\n{rows['machine']}")
    for row in rows["cpu"]:
        print(f"{row['what']:<90} bf16 {row['bf16_ms']:9.3f} ms  int8 {row['int8_ms']:9.3f} ms  int8/bf16 "
              f"{row['ratio']:.2f}")
    for row in rows.get("tpu", []):
        print(f"{row['what']:<90} bytes accessed bf16 {row['bf16_bytes_accessed'] / 1e9:.2f} GB  int8 "
              f"{row['int8_bytes_accessed'] / 1e9:.2f} GB  int8/bf16 {row['bytes_ratio']:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
