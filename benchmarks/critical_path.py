"""The paper's speed-quality table in miniature, on CPU: model calls on the critical path and fact accuracy.

The shipped default models (pdjax/assets/default_model/{pd,ar,diffusion})
answer the held-out prompts shipped with them; every answer is scored by
`pdjax.synthetic.check_completion` (fact accuracy: expected facts stated right
in the clean answer). AR decodes once; planned diffusion (pd) and Dream-style
diffusion decode once per setting of steps_ratio in {0.25, 0.5, 0.75, 1.0} and
confidence_threshold in {off, 0.5, 0.7, 0.9}. The table gives, per setting,
the mean model calls per answer (each answer's own critical path, counted by
the decoder), AR / PD and AR / diffusion, and each one's fact accuracy; all of
it measured in this one run.

Decoding: greedy (temperature 0, no top-p) unless flags say otherwise; pd and
ar with max_length 256; diffusion with exactly 64 masks per prompt
(``max_new_tokens``: the diffusion baseline is trained on answers filled with
<|im_end|> to 64 tokens). Calls are each answer's own, so batching (16 prompts
per decoder call) does not change them.

    python benchmarks/critical_path.py [--models pdjax/assets/default_model] [--num_prompts N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

STEPS_RATIOS = (0.25, 0.5, 0.75, 1.0)
THRESHOLDS = (None, 0.5, 0.7, 0.9)
MAX_LENGTH = 256
DIFFUSION_NEW_TOKENS = 64


def read_heldout(path: str, limit: int | None) -> list[dict[str, Any]]:
    """Held-out rows (prompt, facts, ...) of a JSONL file, the first `limit` of them."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if limit is None else rows[:limit]


def score(model: Any, prompts: Sequence[Any], rows: Sequence[dict], options: Any) -> dict[str, Any]:
    """Decode `prompts` and score the answers: mean model calls, fact accuracy, well-formed share, seconds."""
    from pdjax.eval import decode_prompts
    from pdjax.synthetic import check_completion, summarize

    t0 = time.perf_counter()
    records = decode_prompts(model, prompts, options)
    seconds = time.perf_counter() - t0
    checks = [check_completion(row["facts"], rec["token_ids"], model.tokenizer) for row, rec in zip(rows, records)]
    s = summarize(checks)
    return {
        "calls": statistics.fmean(r["model_calls"] for r in records),
        "fact_accuracy": s["fact_accuracy"],
        "well_formed": s["well_formed"],
        "planned": s["planned"],
        "seconds": seconds,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="folder with pd/, ar/, diffusion/ (default: the shipped ones)")
    p.add_argument("--heldout", default=None, help="held-out JSONL (default: heldout.jsonl of the pd model)")
    p.add_argument("--num_prompts", type=int, default=None, help="the first N held-out prompts (default: all)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts decoded together (calls are counted per answer)")
    p.add_argument("--max_length", type=int, default=MAX_LENGTH)
    p.add_argument("--diffusion_new_tokens", type=int, default=DIFFUSION_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=None, help="default: none at temperature 0, else 0.95")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurements here")
    args = p.parse_args(argv)

    import jax

    from pdjax.decode import DecodeConfig, DecodeOptions
    from pdjax.eval import default_model_path, load_eval_model, prompts_from_rows

    root = args.models or os.path.dirname(default_model_path("pd"))
    paths = {mode: os.path.join(root, mode) for mode in ("pd", "ar", "diffusion")}
    missing = [m for m, path in paths.items() if not os.path.isdir(path)]
    if missing:
        raise SystemExit(f"no {', '.join(missing)} model under {root} (train and ship the default models first)")
    rows = read_heldout(args.heldout or os.path.join(paths["pd"], "heldout.jsonl"), args.num_prompts)
    prompts = prompts_from_rows([r["prompt"] for r in rows], "heldout")
    top_p = args.top_p if args.top_p is not None else (None if args.temperature == 0 else 0.95)

    def options(mode: str, steps_ratio: float = 1.0, threshold: float | None = None) -> DecodeOptions:
        new = args.diffusion_new_tokens if mode == "diffusion" else None
        return DecodeOptions(steps_ratio=steps_ratio, confidence_threshold=threshold, temperature=args.temperature,
                             top_p=top_p, seed=args.seed, max_new_tokens=new)

    start = time.perf_counter()
    models = {
        mode: load_eval_model(paths[mode], DecodeConfig(mode=mode, max_length=args.max_length,
                                                         batch_size=args.batch_size), dtype="float32")
        for mode in paths
    }
    ar = score(models["ar"], prompts, rows, options("ar"))
    results = []
    for ratio in STEPS_RATIOS:
        for tau in THRESHOLDS:
            results.append({"steps_ratio": ratio, "confidence_threshold": tau,
                            "pd": score(models["pd"], prompts, rows, options("pd", ratio, tau)),
                            "diffusion": score(models["diffusion"], prompts, rows, options("diffusion", ratio, tau))})
    wall = time.perf_counter() - start

    t = Table(title=f"critical path and fact accuracy: {len(rows)} held-out prompts, default models "
                    f"(AR: {ar['calls']:.1f} calls, fact accuracy {_pct(ar['fact_accuracy'])})")
    for col in ("steps_ratio", "τ", "PD calls", "AR / PD", "PD fact acc", "PD well-formed",
                "diffusion calls", "AR / diffusion", "diffusion fact acc"):
        t.add_column(col, justify="right")
    for r in results:
        pd_, df = r["pd"], r["diffusion"]
        tau = r["confidence_threshold"]
        t.add_row(f"{r['steps_ratio']:g}", "off" if tau is None else f"{tau:g}", f"{pd_['calls']:.1f}",
                  f"{ar['calls'] / pd_['calls']:.2f}x", _pct(pd_["fact_accuracy"]), _pct(pd_["well_formed"]),
                  f"{df['calls']:.1f}", f"{ar['calls'] / df['calls']:.2f}x", _pct(df["fact_accuracy"]))
    env = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "prompts": len(rows),
        "max_length": args.max_length,
        "diffusion_new_tokens": args.diffusion_new_tokens,
        "temperature": args.temperature,
        "top_p": top_p,
        "seed": args.seed,
        "models": root,
        "wall_s": round(wall, 1),
    }
    console = Console()
    console = console if console.is_terminal else Console(width=200)
    console.print(t)
    console.print(env)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "ar": ar, "settings": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
