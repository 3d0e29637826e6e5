"""Peak host memory of `load_pretrained` on a multi-shard checkpoint, as a multiple of its largest shard.

Builds a random Qwen2-shaped checkpoint (default ~250 MB float32, ~50 MB shards)
with `save_pretrained`, then loads it in a fresh subprocess per setting and reads
that process's peak RSS during the load only (Linux: the high-water mark is reset
through /proc/self/clear_refs after imports and JAX start-up; elsewhere the
process peak from getrusage, which then includes import time).

On the CPU backend the loaded arrays live in host memory too, so the report
separates what the model itself occupies (its bytes, resident after the load)
from the loader's transient overhead: peak - baseline - model bytes. The goal is
an overhead under 2x the largest shard file (never the whole model on the host).

Run: /work/venv/bin/python benchmarks/checkpoint_memory.py [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

MB = 2**20

LOADER = textwrap.dedent(
    """
    import json, os, resource, sys, time
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from pdjax.model import load_pretrained, make_mesh

    def rss():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

    path, mesh_spec = sys.argv[1], json.loads(sys.argv[2])
    jnp.zeros(1).block_until_ready()  # start the backend before the baseline
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark: measure the load alone
        reset = True
    except OSError:
        reset = False
    baseline, _ = rss()
    start = time.perf_counter()
    model = load_pretrained(path, mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    seconds = time.perf_counter() - start
    after, peak = rss()
    if not reset:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    print(json.dumps(dict(baseline=baseline, peak=peak, after=after, model_bytes=model_bytes,
                          seconds=seconds, peak_reset=reset, devices=len(jax.devices()))))
    """
)


def build(path: str, vocab: int, hidden: int, layers: int, mlp: int, shard_mb: int) -> None:
    """A random float32 Dream/Qwen2 checkpoint written by pdjax in HF layout, with shards of `shard_mb`."""
    from pdjax.model import DreamConfig, init_model, save_pretrained

    heads = hidden // 64
    config = DreamConfig.tiny(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 4),
        head_dim=64,
    )
    save_pretrained(init_model(config), path, max_shard_size=shard_mb * MB)


def measure(path: str, mesh: dict | None, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run(
        [sys.executable, "-c", LOADER, path, json.dumps(mesh)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="checkpoint folder (built if it holds no config.json)")
    parser.add_argument("--keep", action="store_true", help="keep the built checkpoint")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--shard-mb", type=int, default=50)
    args = parser.parse_args()

    tmp = None
    path = args.dir
    if path is None:
        tmp = tempfile.mkdtemp(prefix="pdjax_ckpt_")
        path = tmp
    if not os.path.exists(os.path.join(path, "config.json")):
        build(path, args.vocab, args.hidden, args.layers, args.mlp, args.shard_mb)
    shards = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")}
    total, largest = sum(shards.values()), max(shards.values())
    print(f"checkpoint {path}: {len(shards)} shards, {total / MB:.1f} MiB, largest shard {largest / MB:.1f} MiB")
    settings = [("1 device", None, 1), ("8 devices, fsdp=8", {"fsdp": 8}, 8), ("8 devices, fsdp=2 x tensor=4", {"fsdp": 2, "tensor": 4}, 8)]
    for name, mesh, devices in settings:
        r = measure(path, mesh, devices)
        rise = r["peak"] - r["baseline"]
        overhead = rise - r["model_bytes"]
        print(
            f"{name:30s} peak-baseline {rise / MB:7.1f} MiB ({rise / largest:.2f}x largest shard) | "
            f"model {r['model_bytes'] / MB:6.1f} MiB | loader overhead {overhead / MB:6.1f} MiB "
            f"= {overhead / largest:.2f}x largest shard | resident after {(r['after'] - r['baseline']) / MB:6.1f} MiB | "
            f"{r['seconds']:.1f} s{'' if r['peak_reset'] else ' (peak includes imports)'}"
        )
    if tmp is not None and not args.keep:
        import shutil

        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
