"""The paper's speed-quality table in miniature, on CPU: model calls on the critical path and fact accuracy.

The shipped default models (pdjax/assets/default_model/{pd,ar,diffusion})
answer the held-out prompts shipped with them, all in this one run; every
answer is scored by `pdjax.synthetic.check_completion` (fact accuracy: the
expected facts stated right in the clean answer). AR decodes once; planned
diffusion (pd) once per setting of the grid steps_ratio x confidence_threshold;
the diffusion-only baseline once per setting of its own (shorter) list, on all
prompts or the first --diffusion_prompts. Each row gives the mean model calls
per answer (each answer's own critical path, counted by the decoder, so batching
never changes it), AR calls / its calls, fact accuracy, well-formed share and
decode seconds per prompt. `--per_call` adds the wall time of one model call of
each kind (an AR step, a PD plan step, a denoising round, a commit), measured
with the decoder's profiler at batch 1 on a few prompts.

Decoding (`pdjax.eval.heldout`): greedy unless flags say otherwise; pd and ar
with max_length --max_length; diffusion with exactly the model's own number of
masks (its generation_config.json `max_new_tokens`: the length its training
answers were filled to with <|im_end|>) and a cache of the longest prompt plus
the masks. pd and diffusion decode one prompt at a time and AR 16 at a time,
with answers identical to any other batching: on a 2-core CPU a batched call is
as wide as its widest row and decodes PD ~3x slower than batch 1.

Flags:
  --models DIR              folder with pd/, ar/, diffusion/ (default: the shipped models)
  --heldout FILE            held-out JSONL (default: pd/heldout.jsonl)
  --num_prompts N           the first N held-out prompts (default: all)
  --steps_ratios 0.25,0.5,1.0     pd's steps_ratio values
  --thresholds off,0.9            pd's confidence_threshold values (off: the scheduled top-k)
  --diffusion_settings 0.25:off   diffusion's settings, ratio:threshold, comma-separated ("" skips it)
  --diffusion_prompts N     diffusion on the first N of the prompts (default: all; ~300 masks per call is its cost)
  --diffusion_new_tokens N  masks (default: the diffusion model's max_new_tokens)
  --max_length 512          pd and ar: prompt + response budget
  --batch_size 1, --ar_batch_size 16
  --per_call N              profile N prompts per model for the per-call table (0: off; default 8)
  --temperature 0, --top_p, --seed 0
  --json out.json           also write every measurement

    python benchmarks/critical_path.py [--num_prompts N] [--steps_ratios ...] [--thresholds ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Sequence

STEPS_RATIOS = (0.25, 0.5, 1.0)
THRESHOLDS: tuple[float | None, ...] = (None, 0.9)
DIFFUSION_SETTINGS: tuple[tuple[float, float | None], ...] = ((0.25, None),)
PER_CALL_PROMPTS = 8
CALL_KINDS = ("prefill", "plan", "denoise", "commit")


def read_heldout(path: str, limit: int | None) -> list[dict[str, Any]]:
    """Held-out rows (prompt, facts, ...) of a JSONL file, the first `limit` of them."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if limit is None else rows[:limit]


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"steps_ratio must be in (0, 1], got {text}")
    return value


def _threshold(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"confidence_threshold must be 'off' or in [0, 1], got {text}")
    return value


def _list(parse: Any) -> Any:
    def parse_list(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        return tuple(parse(t) for t in items)

    return parse_list


def _setting(text: str) -> tuple[float, float | None]:
    ratio, sep, tau = text.partition(":")
    return _ratio(ratio), _threshold(tau if sep else "off")


def _diffusion_settings(text: str) -> tuple[tuple[float, float | None], ...]:
    return tuple(_setting(t.strip()) for t in text.split(",") if t.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line (documented in the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="folder with pd/, ar/, diffusion/ (default: the shipped ones)")
    p.add_argument("--heldout", default=None, help="held-out JSONL (default: heldout.jsonl of the pd model)")
    p.add_argument("--num_prompts", type=_positive, default=None, help="the first N held-out prompts (default: all)")
    p.add_argument("--steps_ratios", type=_list(_ratio), default=STEPS_RATIOS)
    p.add_argument("--thresholds", type=_list(_threshold), default=THRESHOLDS)
    p.add_argument("--diffusion_settings", type=_diffusion_settings, default=DIFFUSION_SETTINGS)
    p.add_argument("--diffusion_prompts", type=_positive, default=None)
    p.add_argument("--diffusion_new_tokens", type=_positive, default=None)
    p.add_argument("--max_length", type=_positive, default=None, help="pd and ar (default: 512)")
    p.add_argument("--batch_size", type=_positive, default=1, help="pd and diffusion prompts decoded together")
    p.add_argument("--ar_batch_size", type=_positive, default=16)
    p.add_argument("--per_call", type=_count, default=PER_CALL_PROMPTS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=None, help="default: none at temperature 0, else 0.95")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the measurements here")
    return p


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _tau(t: float | None) -> str:
    return "off" if t is None else f"{t:g}"


def _row(result: dict[str, Any]) -> dict[str, Any]:
    """What the table and the JSON keep of a `decode_and_score` result."""
    s = result["summary"]
    return {"calls": result["calls"], "fact_accuracy": s["fact_accuracy"], "span_accuracy": s.get("span_accuracy"),
            "well_formed": s["well_formed"], "planned": s["planned"], "prompts": s["answers"],
            "seconds": result["seconds"], "s_per_prompt": result["s_per_prompt"]}


def issue_targets(ar: dict[str, Any], pd_rows: Sequence[dict[str, Any]], points: float = 0.05) -> dict[str, Any]:
    """Issue 14's reading of the table: AR / PD calls and the fact-accuracy gap at steps_ratio 1.0 (each τ), and
    the largest AR / PD among the settings whose fact accuracy is within `points` of AR's."""
    def gap(r: dict[str, Any]) -> float:
        return (ar["fact_accuracy"] or 0.0) - (r["fact_accuracy"] or 0.0)

    lines = []
    at_one = [r for r in pd_rows if r["steps_ratio"] == 1.0]
    for r in at_one:
        g = gap(r)
        side = f"{100 * g:.1f} points below AR" if g >= 0 else f"{-100 * g:.1f} points above AR"
        lines.append(f"steps_ratio 1.0, τ {_tau(r['confidence_threshold'])}: AR / PD calls "
                     f"{ar['calls'] / r['calls']:.2f}x, PD fact accuracy {side}")
    close = [r for r in pd_rows if gap(r) <= points]
    best = max(close, key=lambda r: ar["calls"] / r["calls"], default=None)
    if best is None:
        lines.append(f"no PD setting is within {100 * points:g} points of AR's fact accuracy")
    else:
        lines.append(f"largest AR / PD within {100 * points:g} points of AR's fact accuracy: "
                     f"{ar['calls'] / best['calls']:.2f}x at steps_ratio {best['steps_ratio']:g}, "
                     f"τ {_tau(best['confidence_threshold'])} ({100 * gap(best):.1f} points below AR)")
    return {"lines": lines,
            "best_within": None if best is None else {"steps_ratio": best["steps_ratio"],
                                                      "confidence_threshold": best["confidence_threshold"],
                                                      "ar_over_pd": ar["calls"] / best["calls"],
                                                      "fact_gap": gap(best)}}


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print the tables."""
    args = parser().parse_args(argv)

    import jax
    from rich.console import Console
    from rich.table import Table

    from pdjax.eval import default_model_path
    from pdjax.eval.heldout import (
        PD_MAX_LENGTH,
        decode_and_score,
        decode_options,
        diffusion_masks,
        heldout_prompts,
        load_heldout_model,
        per_call_seconds,
    )

    root = args.models or os.path.dirname(default_model_path("pd"))
    paths = {mode: os.path.join(root, mode) for mode in ("pd", "ar", "diffusion")}
    missing = [m for m, path in paths.items() if not os.path.isdir(path) and (m != "diffusion" or args.diffusion_settings)]
    if missing:
        raise SystemExit(f"no {', '.join(missing)} model under {root} (train and ship the default models first)")
    rows = read_heldout(args.heldout or os.path.join(paths["pd"], "heldout.jsonl"), args.num_prompts)
    diffusion_rows = rows[: args.diffusion_prompts]
    max_length = args.max_length or PD_MAX_LENGTH
    masks = diffusion_masks(paths["diffusion"], args.diffusion_new_tokens) if args.diffusion_settings else None

    def options(mode: str, ratio: float = 1.0, tau: float | None = None) -> Any:
        return decode_options(mode, steps_ratio=ratio, threshold=tau, masks=masks, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)

    start = time.perf_counter()
    models = {
        "ar": load_heldout_model(paths["ar"], "ar", [], max_length=max_length, batch_size=args.ar_batch_size),
        "pd": load_heldout_model(paths["pd"], "pd", [], max_length=max_length, batch_size=args.batch_size),
    }
    if args.diffusion_settings:
        models["diffusion"] = load_heldout_model(paths["diffusion"], "diffusion", heldout_prompts(diffusion_rows),
                                                 batch_size=args.batch_size, masks=masks)
    ar = _row(decode_and_score(models["ar"], rows, options("ar")))
    pd_rows = [{"steps_ratio": r, "confidence_threshold": t, **_row(decode_and_score(models["pd"], rows, options("pd", r, t)))}
               for r in args.steps_ratios for t in args.thresholds]
    diffusion = [{"steps_ratio": r, "confidence_threshold": t,
                  **_row(decode_and_score(models["diffusion"], diffusion_rows, options("diffusion", r, t)))}
                 for r, t in args.diffusion_settings]
    per_call = {}
    if args.per_call:
        per_call = {mode: per_call_seconds(model, (diffusion_rows if mode == "diffusion" else rows)[: args.per_call],
                                           options(mode)) for mode, model in models.items()}
    wall = time.perf_counter() - start

    console = Console()
    console = console if console.is_terminal else Console(width=200)
    t = Table(title=f"critical path and fact accuracy: {len(rows)} held-out prompts (diffusion: {len(diffusion_rows)}), "
                    f"greedy, one run")
    for col in ("model", "steps_ratio", "τ", "calls", "AR / it", "fact acc", "well-formed", "planned", "s / prompt"):
        t.add_column(col, justify="right")
    t.add_row("AR", "-", "-", f"{ar['calls']:.1f}", "1.00x", _pct(ar["fact_accuracy"]), _pct(ar["well_formed"]),
              _pct(ar["planned"]), f"{ar['s_per_prompt']:.2f}")
    for name, results in (("PD", pd_rows), ("diffusion", diffusion)):
        for r in results:
            t.add_row(name, f"{r['steps_ratio']:g}", _tau(r["confidence_threshold"]), f"{r['calls']:.1f}",
                      f"{ar['calls'] / r['calls']:.2f}x", _pct(r["fact_accuracy"]), _pct(r["well_formed"]),
                      _pct(r["planned"]), f"{r['s_per_prompt']:.2f}")
    console.print(t)
    targets = issue_targets(ar, pd_rows)
    for line in targets["lines"]:
        console.print(line)
    if per_call:
        c = Table(title=f"wall time per model call, batch 1, {args.per_call} prompts, steps_ratio 1.0 (profiled)")
        for col in ("model", "prefill", "plan / AR step", "denoising round", "commit"):
            c.add_column(col, justify="right")
        for mode, kinds in per_call.items():
            c.add_row(mode, *(f"{1e3 * kinds[k]['s_per_call']:.2f} ms ({kinds[k]['calls']})" if k in kinds else "-"
                              for k in CALL_KINDS))
        console.print(c)
    env = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "prompts": len(rows),
        "diffusion_prompts": len(diffusion_rows),
        "max_length": max_length,
        "diffusion_masks": masks,
        "diffusion_max_length": models["diffusion"].config.max_length if "diffusion" in models else None,
        "batch_size": args.batch_size,
        "ar_batch_size": args.ar_batch_size,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "models": root,
        "wall_s": round(wall, 1),
    }
    console.print(env)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "ar": ar, "pd": pd_rows, "diffusion": diffusion, "per_call": per_call,
                       "targets": targets}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
