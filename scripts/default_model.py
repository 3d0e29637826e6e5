"""Evaluate and ship the default models (pdjax/assets/default_model/{pd,ar,diffusion}).

    python scripts/default_model.py eval  MODEL_DIR --heldout runs/default_model/data/heldout.jsonl --mode pd
    python scripts/default_model.py ship  runs/default_model/pd/hf pdjax/assets/default_model/pd --mode pd \
        --config configs/default_model.yaml --heldout runs/default_model/data/heldout.jsonl

`eval` decodes held-out prompts (greedy by default) through `pdjax.eval` and scores every answer with
`pdjax.synthetic.check_completion`: well-formed plans, planned share, span accuracy, fact accuracy,
model calls on the critical path. `ship` re-saves a trained Hugging Face folder with bfloat16 weights,
the tokenizer, the held-out prompts the tests use and a model card.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any, Sequence

# Decoder settings of each baseline: the diffusion model is trained on eos-filled answers of this many tokens.
DIFFUSION_NEW_TOKENS = 64
PLANNED_MAX_LENGTH = 256


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of a JSONL file (all when None)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load(model_dir: str, dtype: str = "float32") -> tuple[Any, Any]:
    """(DreamModel computing in `dtype`, tokenizer) of a Hugging Face folder."""
    from pdjax.model import load_pretrained
    from pdjax.model.tokenizer import load_tokenizer

    return load_pretrained(model_dir, dtype=dtype, param_dtype=dtype), load_tokenizer(model_dir)


def evaluate(
    model_dir: str,
    rows: Sequence[dict],
    mode: str,
    *,
    batch_size: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "float32",
    new_tokens: int = DIFFUSION_NEW_TOKENS,
) -> dict:
    """Decode `rows` (held-out records) with the model in `model_dir` in `mode` and score them.

    Decoding goes through `pdjax.eval` (as `benchmarks/critical_path.py` does): max_length 256, and in
    ``diffusion`` mode exactly `new_tokens` masks per prompt. Returns the summary with per-shape splits.
    """
    from pdjax.decode import DecodeConfig, DecodeOptions
    from pdjax.eval import decode_prompts, load_eval_model, prompts_from_rows
    from pdjax.synthetic import check_completion, summarize

    config = DecodeConfig(mode=mode, max_length=PLANNED_MAX_LENGTH, batch_size=min(batch_size, len(rows)))
    model = load_eval_model(model_dir, config, dtype=dtype)
    options = DecodeOptions(temperature=temperature, top_p=None if temperature == 0 else 0.95, seed=seed,
                            max_new_tokens=new_tokens if mode == "diffusion" else None)
    start = time.perf_counter()
    records = decode_prompts(model, prompts_from_rows([r["prompt"] for r in rows], "heldout"), options)
    seconds = time.perf_counter() - start

    tokenizer = model.tokenizer
    checks = [check_completion(r["facts"], rec["token_ids"], tokenizer) for r, rec in zip(rows, records)]
    summary = summarize(checks)
    summary["mode"] = mode
    summary["decode_s"] = round(seconds, 1)
    summary["model_calls_mean"] = round(statistics.fmean(rec["model_calls"] for rec in records), 2)
    summary["async_groups_mean"] = round(statistics.fmean(rec["groups"] for rec in records), 2)
    summary["finish"] = dict(collections.Counter(rec["finish_reason"] for rec in records))
    def split(key: str) -> dict[str, dict]:
        groups: dict[str, list] = collections.defaultdict(list)
        for r, c in zip(rows, checks):
            groups[r[key]].append(c)
        return {name: summarize(cs) for name, cs in sorted(groups.items())}

    summary["by_shape"] = split("shape")
    summary["fact_accuracy_by_family"] = {f: s["fact_accuracy"] for f, s in split("family").items()}
    summary["examples"] = [
        {"prompt": r["prompt"], "answer": c.answer, "well_formed": c.well_formed, "facts_right": f"{c.facts_right}/{c.facts}",
         "response": tokenizer.decode(rec["token_ids"], skip_special_tokens=False)}
        for r, c, rec in list(zip(rows, checks, records))[:6]
    ]
    return summary


MODEL_CARD = """\
# pdjax default model: {mode}

{what}

- Architecture: Qwen2 (`Qwen2ForCausalLM` layout), {params:,} parameters, weights stored in bfloat16.
- Trained from scratch by pdjax on CPU: `python -m pdjax.train --config {config}`
  (data mode `{data_mode}`, {steps} steps, seed {seed}).
- Data: the synthetic checkable instruction data of `pdjax.synthetic` (ours, generated from a seed;
  same licence as pdjax). Tokenizer: the byte-level BPE trained by `pdjax.synthetic` on that data,
  with the plan-language control tokens added under their released strings.
- `heldout.jsonl`: held-out prompts (never in training) with the facts a right answer states;
  score answers with `pdjax.synthetic.check_completion`.

Held-out metrics measured when it was shipped ({n} prompts, greedy decoding, the trained float32 weights
before the bfloat16 cast; `python scripts/default_model.py eval`):

{metrics}

It only knows the toy tasks of its data (numbers, words, weekdays, months, small price lists).
"""

WHAT = {
    "pd": "A planned-diffusion model: it writes an AR plan of promises, then fills the promised spans "
    "in parallel by diffusion (`python -m pdjax.decode --mode pd`).",
    "ar": "The AR-only baseline: the same answers with the plan tags stripped, trained causally "
    "(`python -m pdjax.decode --mode ar`).",
    "diffusion": "The diffusion-only baseline: the same answers with the plan tags stripped, the whole answer "
    f"one bidirectional block, trained on answers filled with `<|im_end|>` to {DIFFUSION_NEW_TOKENS} tokens "
    f"(decode {DIFFUSION_NEW_TOKENS} masks: `python -m pdjax.decode --mode diffusion`).",
}


def ship(src: str, dst: str, mode: str, config_path: str, heldout: str, num_heldout: int, metrics: dict | None) -> None:
    """Write `src` (a trained HF folder) to `dst` in bfloat16 with its tokenizer, held-out prompts and model card."""
    import jax.numpy as jnp
    import yaml

    from pdjax.model import save_pretrained

    model, tokenizer = load(src)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    save_pretrained(model, dst, tokenizer=tokenizer, dtype=jnp.bfloat16)
    if os.path.isfile(os.path.join(src, "generation_config.json")):  # the decode mode and mask count of the export
        shutil.copy(os.path.join(src, "generation_config.json"), dst)
    rows = read_jsonl(heldout, num_heldout)
    with open(os.path.join(dst, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            keep = {k: r[k] for k in ("id", "prompt", "completion", "answer", "shape", "family", "facts")}
            f.write(json.dumps(keep, ensure_ascii=False) + "\n")
    with open(config_path) as f:
        cfg = yaml.safe_load(f)
    lines = []
    if metrics:
        for key in ("well_formed", "planned", "span_accuracy", "fact_accuracy", "model_calls_mean"):
            value = metrics.get(key)
            lines.append(f"- {key}: {value if value is None or key == 'model_calls_mean' else f'{value:.3f}'}")
    card = MODEL_CARD.format(
        mode=mode,
        what=WHAT[mode],
        params=model.config.num_params,
        config=config_path,
        data_mode=cfg["data"]["mode"],
        steps=cfg["steps"],
        seed=cfg["seed"],
        n=metrics.get("answers") if metrics else 0,
        metrics="\n".join(lines) or "- (not measured)",
    )
    with open(os.path.join(dst, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def main(argv: Sequence[str] | None = None) -> int:
    """`eval` or `ship` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="scripts/default_model.py")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="decode held-out prompts and score them")
    e.add_argument("model_dir")
    e.add_argument("--heldout", required=True)
    e.add_argument("--mode", choices=("pd", "ar", "diffusion"), default="pd")
    e.add_argument("--num", type=int, default=None)
    e.add_argument("--batch_size", type=int, default=32)
    e.add_argument("--dtype", default="float32")
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--out", help="write the summary JSON here")
    s = sub.add_parser("ship", help="re-save a trained folder as a shipped default model")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--mode", choices=("pd", "ar", "diffusion"), required=True)
    s.add_argument("--config", required=True)
    s.add_argument("--heldout", required=True)
    s.add_argument("--num_heldout", type=int, default=200)
    s.add_argument("--metrics", help="a summary JSON written by `eval --out` for the model card")
    args = p.parse_args(argv)
    if args.command == "eval":
        rows = read_jsonl(args.heldout, args.num)
        summary = evaluate(args.model_dir, rows, args.mode, batch_size=args.batch_size, temperature=args.temperature,
                           dtype=args.dtype)
        text = json.dumps(summary, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    metrics = None
    if args.metrics:
        with open(args.metrics) as f:
            metrics = json.load(f)
    ship(args.src, args.dst, args.mode, args.config, args.heldout, args.num_heldout, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
