"""Train-step time: planned-diffusion segments vs a plain causal mask; packing vs the reference's batch-1 layout.

One run, one model, one packed batch:

1. Step time. The trainer's jitted step (hybrid loss, AdamW) runs on a packed
   batch of the synthetic checkable data (``pdjax.synthetic``) twice over: with
   its planned-diffusion segment ids, and with the same tokens under a plain
   causal mask (every document causal, no blocks: the AR baseline's layout). The
   shapes are equal, so both use one compiled step; the ratio shows what the
   plan structure (mask, masking, two-part loss) costs per step.
2. Packing. The data pipeline's first-fit rows against the released trainer's
   layout: one example per step, which under a static shape (TPU) is one
   example padded to the row length. Efficiency = non-padding fraction of the
   token slots.

The ``xla`` attention evaluates the full [L, L] score matrix whatever the
mask, so there the ratio shows only the loss's extra work; the block-sparse
``pallas_tpu`` kernel skips empty tiles and needs a TPU (``--attention_impl pallas_tpu``).

Run: /work/venv/bin/python benchmarks/train_step.py [--row_length 512] [--batch_size 8] [--steps 20]
     (XLA_FLAGS=--xla_force_host_platform_device_count=8 ... --mesh 1,2,4 for a sharded CPU run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from pdjax.data import packing_efficiency
from pdjax.structure import Role
from pdjax.train.config import load_config
from pdjax.train.trainer import Trainer


def causal(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same rows under a plain causal mask: no blocks, every token visible from its own position on."""
    out = dict(batch)
    out["block_id"] = np.zeros_like(batch["block_id"])
    out["visible_from"] = batch["position"].copy()
    role = batch["role"].copy()
    role[np.isin(role, (Role.TAG, Role.SPAN))] = Role.PLAN  # all response tokens are AR targets
    out["role"] = role
    return out


def time_steps(trainer: Trainer, batch: dict[str, np.ndarray], steps: int) -> list[float]:
    device_batch = trainer.device_batch(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.state, metrics = trainer.step_fn(trainer.state, trainer.frozen, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row_length", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per structure (after one warm-up each)")
    p.add_argument("--docs", type=int, default=1000, help="synthetic training rows to generate")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor sizes (-1: the rest)")
    p.add_argument("--attention_impl", default="xla", help="xla (dense reference, any device) or pallas_tpu (TPU)")
    args = p.parse_args()

    from pdjax.synthetic.dataset import build_dataset

    work = tempfile.mkdtemp(prefix="pdjax-bench-")
    build_dataset(work, seed=0, num_train=args.docs, num_heldout=10)
    data_mesh, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    cfg = load_config(
        None,
        [
            f"data.source={os.path.join(work, 'train.jsonl')}",
            f"data.cache_dir={os.path.join(work, 'cache')}",
            f"data.row_length={args.row_length}",
            f"data.batch_size={args.batch_size}",
            "data.num_epochs=1",
            "data.num_threads=0",
            f"model.tokenizer={os.path.join(work, 'tokenizer')}",
            "model.preset=tiny",
            f"model.attention_impl={args.attention_impl}",
            "steps=1000",
            "log.progress=false",
            f"mesh.data={data_mesh}",
            f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}",
        ],
    )
    trainer = Trainer.create(cfg, log=None)
    batch = next(trainer.data)
    report = trainer.report

    # one warm-up (compilation) per structure, then alternate timed blocks
    time_steps(trainer, batch, 1)
    time_steps(trainer, causal(batch), 1)
    planned_t, causal_t = [], []
    for _ in range(2):
        planned_t += time_steps(trainer, batch, args.steps // 2)
        causal_t += time_steps(trainer, causal(batch), args.steps // 2)
    planned_ms = statistics.median(planned_t) * 1e3
    causal_ms = statistics.median(causal_t) * 1e3

    lengths = []
    for b in range(batch["doc_id"].shape[0]):
        docs = batch["doc_id"][b]
        lengths += [int((docs == d).sum()) for d in np.unique(docs[docs > 0])]
    non_pad = int((batch["role"] != Role.PADDING).sum())
    batch_eff = non_pad / batch["role"].size
    unpacked_eff = packing_efficiency(report.tokens, report.documents, args.row_length)

    device = jax.devices()[0]
    c = trainer.config
    print(f"model: tiny preset (hidden {c.hidden_size}, {c.num_layers} layers, vocab {c.vocab_size}), "
          f"attention_impl={c.attention_impl}, {trainer.mesh.devices.size} x {device.device_kind} ({device.platform}), "
          f"mesh {dict(trainer.mesh.shape)}")
    print(f"batch: {args.batch_size} rows x {args.row_length} tokens, {len(lengths)} documents packed "
          f"(mean {np.mean(lengths):.0f} tokens), pdjax.synthetic data ({report.documents} documents)\n")
    print("| structure of the same packed batch | step time (median of %d) | ratio |" % args.steps)
    print("|---|---|---|")
    print(f"| planned diffusion (segment ids, hybrid loss) | {planned_ms:.1f} ms | 1.00 |")
    print(f"| plain causal mask (AR loss only)             | {causal_ms:.1f} ms | {causal_ms / planned_ms:.2f} |")
    print()
    print("| layout | rows x length per step | documents per step | non-padding fraction |")
    print("|---|---|---|---|")
    print(f"| pdjax first-fit packing (this batch)         | {args.batch_size} x {args.row_length} | {len(lengths)} | {batch_eff:.1%} |")
    print(f"| pdjax first-fit packing (epoch 0, all rows)  | {args.batch_size} x {args.row_length} | "
          f"{args.batch_size * report.documents / report.rows_per_epoch[0]:.1f} | {report.packing_efficiency:.1%} |")
    print(f"| reference batch-1 unpacked, padded to the row | 1 x {args.row_length} | 1 | {unpacked_eff:.1%} |")
    print(f"\npacked / unpacked non-padding fraction: {report.packing_efficiency / unpacked_eff:.1f}x")
    trainer.close()


if __name__ == "__main__":
    main()
