"""What int8 (and int4) weights change in the shipped default models' answers: greedy agreement and fact accuracy.

Each of pdjax/assets/default_model/{ar,diffusion,pd} (in that order: the shipped PD model may be replaced while a
long run is under way, and each row records the SHA-256 of the weights it measured) answers its held-out prompts
greedily with its checkpoint's weights and again with the same weights quantized at load time
(`load_pretrained(..., quantize=...)`: weight-only, one float32 scale per output channel). The decode programs
and the scoring are `pdjax.eval.heldout`'s, as in `scripts/default_model.py eval`: float32 compute, pd and ar
with max_length 512, diffusion with the model's own number of masks. Per mode and weight format the row gives:

- same tokens: the share of prompts whose response token ids equal the unquantized model's, every token;
- prefix: the mean share of the unquantized response that the quantized one reproduces before it first differs;
- fact accuracy and well-formed share (`pdjax.synthetic.check_completion`), and the fact accuracy's change in
  points against the unquantized weights.

    python benchmarks/quantize_quality.py [--modes ar,diffusion,pd] [--quantize int8,int4] [--num N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Sequence

MODES = ("ar", "diffusion", "pd")


def read_rows(path: str, limit: int | None) -> list[dict[str, Any]]:
    """Held-out rows (prompt, facts, ...) of a JSONL file, the first `limit`."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def prefix_share(reference: Sequence[int], other: Sequence[int]) -> float:
    """The share of `reference` that `other` reproduces before the first token where they differ."""
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / max(len(reference), 1)


def measure(folder: str, mode: str, rows: Sequence[dict[str, Any]], weights: Sequence[str | None]) -> list[dict]:
    """One row per weight format (None first: the checkpoint's own weights) for one model and mode."""
    from pdjax.eval.heldout import (
        decode_and_score,
        decode_options,
        diffusion_masks,
        heldout_prompts,
        load_heldout_model,
    )

    masks = diffusion_masks(folder) if mode == "diffusion" else None
    options = decode_options(mode, masks=masks)
    from pdjax.decode.model_info import weights_sha256

    sha = weights_sha256(folder)
    out, reference = [], None
    for quantize in weights:
        t0 = time.perf_counter()
        model = load_heldout_model(folder, mode, heldout_prompts(rows), masks=masks, quantize=quantize)
        result = decode_and_score(model, rows, options)
        tokens = [rec["token_ids"] for rec in result["records"]]
        summary = result["summary"]
        row = {"mode": mode, "weights": quantize or "bfloat16", "prompts": len(rows), "weights_sha256": sha,
               "fact_accuracy": summary["fact_accuracy"], "well_formed": summary["well_formed"],
               "model_calls_mean": round(result["calls"], 2), "decode_s": round(result["seconds"], 1),
               "wall_s": round(time.perf_counter() - t0, 1)}
        if reference is None:
            reference = {"tokens": tokens, "fact_accuracy": summary["fact_accuracy"]}
        row["same_tokens"] = statistics.fmean(a == b for a, b in zip(reference["tokens"], tokens))
        row["prefix"] = statistics.fmean(prefix_share(a, b) for a, b in zip(reference["tokens"], tokens))
        row["fact_accuracy_change_points"] = 100 * (summary["fact_accuracy"] - reference["fact_accuracy"])
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| mode | weights | prompts | same tokens | prefix | fact accuracy | change (points) | well-formed | "
             "weights sha256 |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['weights']} | {r['prompts']} | {r['same_tokens']:.1%} | {r['prefix']:.1%} | "
                     f"{r['fact_accuracy']:.3f} | {r['fact_accuracy_change_points']:+.1f} | {r['well_formed']:.3f} | "
                     f"`{r['weights_sha256'][:12]}` |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the modes asked for, print each row as it is measured, then the table."""
    from pdjax.decode.model_info import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, measured in this order")
    p.add_argument("--quantize", default="int8", help="comma-separated weight formats beside the checkpoint's")
    p.add_argument("--num", type=int, default=None, help="the first N held-out prompts (default: all)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    for mode in args.modes.split(","):
        folder = default_model_path(mode)
        heldout = read_rows(os.path.join(folder, "heldout.jsonl"), args.num)
        rows += measure(folder, mode, heldout, [None, *args.quantize.split(",")])
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; greedy, float32 compute\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
