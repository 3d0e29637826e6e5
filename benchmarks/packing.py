"""Packing efficiency: pdjax's first-fit packed rows vs the released reference's batch-1 unpacked layout.

Efficiency = the fraction of token slots that hold document tokens (not padding).
The released code trains one example per step. On TPUs every step needs a
static shape, so that layout means each example padded to the maximum length
(the row length here); on GPUs it runs unpadded but still one sequence per
step. pdjax packs documents first-fit into rows of the same length (the code
path of `pdjax.data.build_pipeline`: `first_fit` over the epoch's lengths with
its [PAD] draw, window `DataConfig.pack_window`).

Synthetic documents follow METHOD §5's workload (stated, not measured here):
- prompt: the chat template's ~20 tokens + a user turn, lognormal, median 40 tokens;
- rounds: 60% of responses have a second plan round after a <sync/>, 10% a third;
- promises per round: geometric with p = 0.32 (median 2, mean 3.1), at most 10;
- per promise ~6 plan tokens; promised length 10..200 (U{1..20} x 10), content 60-100%
  of it, + 2 tags and U{0..10} [PAD]; ~5 plain tokens per round, <sync/> / <|im_end|>.
Documents longer than the row are dropped from both layouts.

Run: /work/venv/bin/python benchmarks/packing.py [--docs 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pdjax.data import first_fit, packing_efficiency


def synthetic_lengths(n: int, seed: int) -> np.ndarray:
    """Token lengths of n planned-diffusion training documents (prompt + annotated response)."""
    rng = np.random.default_rng(seed)
    prompt = 20 + np.clip(rng.lognormal(np.log(40), 0.9, n), 5, 1000).astype(int)
    lengths = np.empty(n, np.int64)
    for i in range(n):
        rounds = 1 + (rng.random() < 0.6) + (rng.random() < 0.1)
        total = prompt[i] + 1  # the final <|im_end|>
        for _ in range(rounds):
            promises = min(int(rng.geometric(0.32)), 10)
            promised = rng.integers(1, 21, promises) * 10
            content = np.ceil(promised * rng.uniform(0.6, 1.0, promises)).astype(int)
            total += 5 + promises * 6 + int(content.sum()) + 2 * promises + int(rng.integers(0, 11, promises).sum())
        lengths[i] = total + rounds - 1  # the <sync/>s
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lengths = synthetic_lengths(args.docs, args.seed)
    q = np.percentile(lengths, [10, 50, 90, 99])
    print(f"{args.docs} synthetic documents: mean {lengths.mean():.0f} tokens, p10/p50/p90/p99 = {q.astype(int).tolist()}")
    order = np.random.default_rng(args.seed + 1).permutation(args.docs)

    print("\nrow length | kept docs | unpacked rows | unpacked eff. | packed rows | packed eff. | ratio (rows saved)")
    print("-----------|-----------|---------------|---------------|-------------|-------------|-------------------")
    for row_length in (1024, 2048, 4096, 8192):
        kept = lengths[order][lengths[order] <= row_length]
        unpacked = packing_efficiency(int(kept.sum()), len(kept), row_length)
        rows = first_fit(kept, row_length, window=32)
        packed = packing_efficiency(int(kept.sum()), len(rows), row_length)
        print(
            f"{row_length:>10} | {len(kept):>9} | {len(kept):>13} | {unpacked:>13.1%} | {len(rows):>11} | "
            f"{packed:>11.1%} | {packed / unpacked:>6.2f}x"
        )

    row_length = 4096
    kept = lengths[order][lengths[order] <= row_length]
    print(f"\nfirst-fit window (DataConfig.pack_window) at row length {row_length}:")
    print("window | rows | packed eff. | plan time per 100k docs")
    for window in (1, 4, 16, 32, 128, 512):
        start = time.perf_counter()
        rows = first_fit(kept, row_length, window=window)
        seconds = (time.perf_counter() - start) * 100_000 / len(kept)
        eff = packing_efficiency(int(kept.sum()), len(rows), row_length)
        print(f"{window:>6} | {len(rows):>4} | {eff:>11.2%} | {seconds:.2f} s")


if __name__ == "__main__":
    main()
