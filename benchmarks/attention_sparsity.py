"""How much of dense attention the `pallas_tpu` kernel skips on planned-diffusion workloads.

Prints one table of ratios measured in this run, per workload and tile size:
tiles the kernel visits and its FLOPs against dense attention, the share of
visited tiles that skip the mask (FULL), the exact density of allowed pairs
(what a perfect sparse kernel would compute), and the HBM bytes of the mask
inputs: the kernel's segment-id arrays against the dense [T, S] mask that
`splash_dense` needs.

Workloads follow the released checkpoint (METHOD §5): prompts of ~100 tokens,
1-3 rounds, 2-4 spans per round of 10-200 tokens (seeded synthetic documents):
denoising one group over a KV cache (decode), one document per row (the
released training recipe), dense groups (PD-DA), and packed training rows of
2k / 4k / 8k tokens. With a GPU present it also times the `xla` path at those
shapes; the Pallas TPU kernel cannot run on a GPU, so no kernel time is printed.

    python benchmarks/attention_sparsity.py [--docs 120] [--seed 0] [--cache 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from pdjax.attention import reference_attention, tile_report
from pdjax.attention.kernel_common import NUM_LANES, NUM_SUBLANES
from pdjax.attention.tiles import round_up
from pdjax.structure import NEVER, ControlIds, Segments, allowed, pack_documents, segments_from_tokens

IDS = ControlIds(
    async_start=1,
    async_end=2,
    sync=3,
    eos=4,
    pad=5,
    promise_start=6,
    promise_end=7,
    mask=8,
    digits=tuple(range(10, 20)),
)
WORD = 100
HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # Dream-7B
TILE_SIZES = ((512, 512), (128, 128))


@dataclasses.dataclass
class Document:
    tokens: list[int]
    prompt_len: int
    groups: list[tuple[int, int]]  # [start, end) of each round's group of spans


def released_document(rng: np.random.Generator) -> Document:
    """A response shaped like the released checkpoint's: 1-3 rounds of 2-4 promised spans."""
    prompt_len = int(rng.integers(80, 121))
    toks = [WORD] * prompt_len
    groups = []
    rounds = int(rng.integers(1, 4))
    for r in range(rounds):
        lengths = rng.integers(10, 201, size=int(rng.integers(2, 5)))
        for n in lengths:
            number = max(1, min(20, round(int(n) / 10)))
            toks += [IDS.promise_start, WORD, WORD] + [IDS.digits[int(d)] for d in str(number)] + [IDS.promise_end]
        start = len(toks)
        for n in lengths:
            toks += [IDS.async_start] + [WORD] * int(n) + [IDS.pad] * int(rng.integers(0, 11)) + [IDS.async_end]
        groups.append((start, len(toks)))
        if r < rounds - 1:
            toks.append(IDS.sync)
        elif rng.random() < 0.5:  # a plain-text tail after a final <sync/>
            toks += [IDS.sync] + [WORD] * int(rng.integers(5, 40)) + [IDS.eos]
        else:
            toks.append(IDS.eos)
    return Document(toks, prompt_len, groups)


def batch(seg: Segments) -> Segments:
    return Segments(*(np.asarray(a, np.int32)[None] for a in seg))


def decode_views(doc: Document, cache: int) -> list[tuple[Segments, Segments]]:
    """Per round: the group being denoised as queries over a cache of `cache` slots
    holding everything up to that group (later slots unwritten: NEVER, block 0)."""
    seg = segments_from_tokens(doc.tokens, doc.prompt_len, IDS)
    n = len(doc.tokens)
    views = []
    for start, end in doc.groups:
        slot = np.arange(cache)
        written = slot < end
        full = [np.pad(a, (0, cache - n)) for a in seg]
        kv = Segments(
            block_id=np.where(written, full[0], 0),
            visible_from=np.where(written, full[1], NEVER),
            position=slot,
            doc_id=np.ones(cache),
            role=np.zeros(cache),
        )
        q = Segments(*(a[start:end] for a in seg))
        views.append((batch(q), batch(kv)))
    return views


def packed_rows(docs: list[Document], length: int) -> list[Segments]:
    """Documents packed in order into rows of `length` (a document that does not fit starts a new row)."""
    rows, current, used = [], [], 0
    for doc in docs:
        n = len(doc.tokens)
        if n > length:
            continue
        if used + n > length:
            rows.append(current)
            current, used = [], 0
        current.append((np.asarray(doc.tokens), segments_from_tokens(doc.tokens, doc.prompt_len, IDS)))
        used += n
    if current:
        rows.append(current)
    return [batch(pack_documents(r, length, pad_id=0)[1]) for r in rows]


@dataclasses.dataclass
class Totals:
    examples: int = 0
    tiles: int = 0
    visited: int = 0
    full: int = 0
    dense_flops: int = 0
    kernel_flops: int = 0
    allowed_pairs: int = 0
    pairs: int = 0
    kernel_mask_bytes: int = 0
    dense_mask_bytes: int = 0

    def add(self, q: Segments, kv: Segments, block_q: int, block_kv: int) -> None:
        t, s = q.position.shape[-1], kv.position.shape[-1]
        # The kernel shrinks a tile to the padded length (as `kernel_common.fit_block` on TPU).
        bq, bkv = min(block_q, round_up(t, NUM_LANES)), min(block_kv, round_up(s, NUM_LANES))
        r = tile_report(q, kv, bq, bkv, num_q_heads=HEADS, head_dim=HEAD_DIM)
        tp, sp = round_up(t, bq), round_up(s, bkv)
        self.examples += 1
        self.tiles += r.tiles
        self.visited += r.partial + r.full
        self.full += r.full
        self.dense_flops += r.dense_flops
        self.kernel_flops += r.kernel_flops
        self.allowed_pairs += int(np.asarray(allowed(q, kv)).sum())
        self.pairs += t * s
        # pallas_tpu: int32 id rows [8, T] and [8, S] (`kernel_common.query_ids` / `key_ids`), two tile plans.
        self.kernel_mask_bytes += 4 * (NUM_SUBLANES * (tp + sp) + 2 * r.tiles)
        # splash_dense: the dense bool mask per example (splash also builds tile-ordered copies of it).
        self.dense_mask_bytes += tp * sp


def measure(workloads: dict[str, list[tuple[Segments, Segments]]]) -> list[tuple[str, tuple[int, int], Totals]]:
    out = []
    for name, views in workloads.items():
        for blocks in TILE_SIZES:
            totals = Totals()
            for q, kv in views:
                totals.add(q, kv, *blocks)
            out.append((name, blocks, totals))
    return out


def shape_of(views: list[tuple[Segments, Segments]]) -> str:
    t = [q.position.shape[-1] for q, _ in views]
    s = [kv.position.shape[-1] for _, kv in views]
    fmt = lambda x: str(x[0]) if min(x) == max(x) else f"{min(x)}-{max(x)}"  # noqa: E731
    return f"{fmt(t)} x {fmt(s)}"


def print_table(console: Console, results, workloads) -> None:
    table = Table(title="pallas_tpu vs dense attention (ratios; FLOPs = QK^T + PV, same tiles in the backward)")
    for col in (
        "workload",
        "examples",
        "T x S",
        "tile",
        "tiles visited",
        "FLOPs kernel/dense",
        "mask-free (FULL) of visited",
        "allowed pairs (exact)",
        "mask HBM kernel / splash_dense",
    ):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for name, (bq, bkv), r in results:
        table.add_row(
            name,
            str(r.examples),
            shape_of(workloads[name]),
            f"{bq}x{bkv}",
            f"{r.visited / r.tiles:.3f}",
            f"{r.kernel_flops / r.dense_flops:.3f}",
            f"{r.full / max(r.visited, 1):.3f}",
            f"{r.allowed_pairs / r.pairs:.3f}",
            f"{r.kernel_mask_bytes / 2**20:.1f} / {r.dense_mask_bytes / 2**20:.1f} MiB "
            f"({r.dense_mask_bytes / r.kernel_mask_bytes:.1f}x less)",
        )
    console.print(table)


def time_xla(console: Console, workloads) -> None:
    """Median wall time of the jitted `xla` path (forward; forward+backward), bf16, B=1, 28/4 heads."""
    if not any(d.platform == "gpu" for d in jax.devices()):
        console.print("GPU timing skipped: no GPU present in this run (no xla times are reported).")
        return
    table = Table(title="xla path on GPU (median of 10, ms; bf16, B=1, 28 query / 4 kv heads, H=128)")
    for col in ("workload", "T x S", "forward", "forward+backward"):
        table.add_column(col)
    fwd = jax.jit(reference_attention)

    @jax.jit
    def fwd_bwd(q, k, v, q_seg, kv_seg):
        loss = lambda q, k, v: reference_attention(q, k, v, q_seg, kv_seg).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for name, views in workloads.items():
        q_seg, kv_seg = max(views, key=lambda v: v[0].position.shape[-1] * v[1].position.shape[-1])
        t, s = q_seg.position.shape[-1], kv_seg.position.shape[-1]
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (1, t, HEADS, HEAD_DIM), jnp.bfloat16)
        k, v = (jax.random.normal(x, (1, s, KV_HEADS, HEAD_DIM), jnp.bfloat16) for x in keys[1:])
        args = (q, k, v, jax.tree.map(jnp.asarray, q_seg), jax.tree.map(jnp.asarray, kv_seg))
        times = []
        for fn in (fwd, fwd_bwd):
            jax.block_until_ready(fn(*args))
            runs = []
            for _ in range(10):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                runs.append(time.perf_counter() - start)
            times.append(f"{1e3 * float(np.median(runs)):.2f}")
        table.add_row(name, f"{t} x {s}", *times)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=120, help="synthetic documents to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=int, default=4096, help="KV cache slots when decoding")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    docs = [released_document(rng) for _ in range(args.docs)]
    lengths = np.array([len(d.tokens) for d in docs])
    dense_docs = [
        (batch(s), batch(s))
        for s in (segments_from_tokens(d.tokens, d.prompt_len, IDS, mode="dense") for d in docs)
    ]
    workloads = {
        f"decode: denoise a group over a {args.cache}-slot cache": [
            v for d in docs if len(d.tokens) <= args.cache for v in decode_views(d, args.cache)
        ],
        "training: one document per row (released recipe)": [
            (batch(s), batch(s)) for s in (segments_from_tokens(d.tokens, d.prompt_len, IDS) for d in docs)
        ],
        "training: one document per row, dense groups (PD-DA)": dense_docs,
        **{f"training: packed rows of {n // 1024}k": [(r, r) for r in packed_rows(docs, n)] for n in (2048, 4096, 8192)},
    }

    console = Console(width=220)
    console.print(
        f"{args.docs} synthetic documents (seed {args.seed}): {int(lengths.min())}-{int(lengths.max())} tokens, "
        f"mean {lengths.mean():.0f}; {sum(len(d.groups) for d in docs)} groups."
    )
    print_table(console, measure(workloads), workloads)
    console.print(
        f"mask HBM per example: pallas_tpu reads int32 segment-id rows [{NUM_SUBLANES}, T] and "
        f"[{NUM_SUBLANES}, S] and two int32 tile plans; splash_dense reads a [T, S] bool mask "
        "(and splash builds tile-ordered copies of it)."
    )
    time_xla(console, workloads)
    console.print(
        "pallas_tpu: no time measured here. It is a Mosaic TPU kernel and cannot run on a GPU or CPU "
        "(interpret mode only checks numerics); time it on a TPU."
    )


if __name__ == "__main__":
    main()
