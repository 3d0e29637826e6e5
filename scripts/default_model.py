"""Evaluate and ship the default models (pdjax/assets/default_model/{pd,ar,diffusion}).

    python scripts/default_model.py ship  runs/default_model/pd/hf pdjax/assets/default_model/pd --mode pd \
        --config configs/default_model.yaml --heldout runs/default_model/data/heldout.jsonl
    python scripts/default_model.py eval  pdjax/assets/default_model/pd --heldout pdjax/assets/default_model/pd/heldout.jsonl \
        --mode pd --out runs/default_model/eval/pd.json          # likewise ar and diffusion
    python scripts/default_model.py card  pdjax/assets/default_model/pd --mode pd --config configs/default_model.yaml \
        --metrics runs/default_model/eval/pd.json runs/default_model/eval/ar.json runs/default_model/eval/diffusion.json

`eval` decodes held-out prompts (greedy by default) through `pdjax.eval` with the programs of
`pdjax.eval.heldout` (as `benchmarks/critical_path.py` does: pd and ar with max_length 512, diffusion
with the model's own mask count from its generation_config.json) and scores every answer with
`pdjax.synthetic.check_completion`: well-formed plans, planned share, span accuracy, fact accuracy,
model calls on the critical path. `ship` re-saves a trained Hugging Face folder with bfloat16 weights,
the tokenizer, the held-out prompts and a model card stating the training recipe (a stage-2 config that
starts from another run's export, or from a shipped folder, names that stage-1 config too: found among
the configs next to it or in the shipped folder's card, or given with --stage1_config). `card` writes the
held-out figures into a shipped folder's card: those `eval --out` measured on that very folder (the
summary records the weights' SHA-256, checked here), beside the other default models' figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import statistics
import sys
from typing import Any, Sequence


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
    batch_size: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "float32",
    new_tokens: int | None = None,
    max_length: int | None = None,
    steps_ratio: float = 1.0,
    records_path: str | None = None,
) -> dict:
    """Decode `rows` (held-out records) with the model in `model_dir` in `mode` and score them.

    Decoding goes through `pdjax.eval` with `pdjax.eval.heldout`'s programs (as
    `benchmarks/critical_path.py`): max_length 512 unless given, and in ``diffusion`` mode exactly
    `new_tokens` masks per prompt (default: the folder's generation_config.json ``max_new_tokens``).
    Returns the summary with per-shape splits; `records_path` gets one JSON line per prompt (its id, spans,
    model calls, facts right and answer).
    """
    from pdjax.decode.model_info import weights_sha256
    from pdjax.eval.heldout import (
        PD_MAX_LENGTH,
        decode_and_score,
        decode_options,
        diffusion_masks,
        heldout_prompts,
        load_heldout_model,
    )
    from pdjax.synthetic import summarize

    masks = diffusion_masks(model_dir, new_tokens) if mode == "diffusion" else None
    model = load_heldout_model(model_dir, mode, heldout_prompts(rows), max_length=max_length or PD_MAX_LENGTH,
                               batch_size=batch_size, masks=masks, dtype=dtype)
    options = decode_options(mode, steps_ratio=steps_ratio, masks=masks, temperature=temperature, seed=seed)
    result = decode_and_score(model, rows, options)
    records, checks = result["records"], result["checks"]
    summary = result["summary"]
    summary["mode"] = mode
    summary["model_dir"] = model_dir
    summary["weights_sha256"] = weights_sha256(model_dir)
    summary["decode_s"] = round(result["seconds"], 1)
    summary["decode"] = {"max_length": model.config.max_length, "batch_size": model.config.batch_size,
                         "diffusion_masks": masks, "temperature": temperature, "seed": seed,
                         "steps_ratio": steps_ratio}
    summary["model_calls_mean"] = round(statistics.fmean(rec["model_calls"] for rec in records), 2)
    summary["async_groups_mean"] = round(statistics.fmean(rec["groups"] for rec in records), 2)
    summary["finish"] = dict(collections.Counter(rec["finish_reason"] for rec in records))
    tokenizer = model.tokenizer
    def split(key: str) -> dict[str, dict]:
        groups: dict[str, list] = collections.defaultdict(list)
        for r, c in zip(rows, checks):
            groups[r[key]].append(c)
        return {name: summarize(cs) for name, cs in sorted(groups.items())}

    summary["by_shape"] = split("shape")
    summary["fact_accuracy_by_family"] = {f: s["fact_accuracy"] for f, s in split("family").items()}
    calls: dict[str, list] = collections.defaultdict(list)
    for r, rec in zip(rows, records):
        calls[r["family"]].append(rec["model_calls"])
    summary["model_calls_by_family"] = {f: round(statistics.fmean(v), 2) for f, v in sorted(calls.items())}
    if records_path:
        with open(records_path, "w", encoding="utf-8") as f:
            for r, c, rec in zip(rows, checks, records):
                f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "family": r["family"], "spans": rec["spans"],
                                    "model_calls": rec["model_calls"], "facts": c.facts, "facts_right": c.facts_right,
                                    "well_formed": c.well_formed, "answer": c.answer}, ensure_ascii=False) + "\n")
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
- Trained by pdjax on CPU, from scratch unless a stage 1 is named:
{recipe}
- Data: the synthetic checkable instruction data of `pdjax.synthetic` (ours, generated from a seed;
  same licence as pdjax). Tokenizer: the byte-level BPE trained by `pdjax.synthetic` on that data,
  with the plan-language control tokens added under their released strings.
- `heldout.jsonl`: {rows} held-out prompts (never in training) with the facts a right answer states;
  score answers with `pdjax.synthetic.check_completion`.

## Held-out figures

{figures}

It only knows the toy tasks of its data (numbers, words, weekdays, months, small price lists).
"""

WHAT = {
    "pd": "A planned-diffusion model: it writes an AR plan of promises, then fills the promised spans "
    "in parallel by diffusion (`python -m pdjax.decode --mode pd`).",
    "ar": "The AR-only baseline: the same answers with the plan tags stripped, trained causally "
    "(`python -m pdjax.decode --mode ar`).",
    "diffusion": "The diffusion-only baseline: the same answers with the plan tags stripped, the whole answer "
    "one bidirectional block, trained on answers filled with `<|im_end|>` to {masks} tokens "
    "(decode {masks} masks: `python -m pdjax.decode --mode diffusion`, which reads the count from this "
    "folder's generation_config.json).",
}

LOSS = {
    "planned": "the hybrid loss (AR on the plan and the text between rounds, diffusion inside the spans)",
    "dense": "the hybrid loss with dense group attention",
    "ar_only": "the AR loss on the answers with the plan tags stripped",
    "diffusion_only": "the diffusion loss on the answers with the plan tags stripped (one bidirectional block, "
    "filled with `<|im_end|>` to {fill} tokens)",
}
METRIC_KEYS = ("well_formed", "planned", "span_accuracy", "fact_accuracy", "model_calls_mean")
KINDS = ("pd", "ar", "diffusion")

FIGURES = """\
Measured on this folder as shipped (its bfloat16 weights, computing in float32) and on the other two
shipped default models, greedy decoding, max length {max_length}, steps_ratio 1.0 (one denoising step
per mask), the diffusion model with its own {masks} masks; each row is reproduced by

    python scripts/default_model.py eval pdjax/assets/default_model/MODE --heldout pdjax/assets/default_model/MODE/heldout.jsonl --mode MODE

| model | held-out prompts | facts right | model calls per answer (critical path) | well-formed | planned |
|---|---|---|---|---|---|
{table}

Measured on the weights whose model.safetensors SHA-256 begins {hashes}.

{comparison}

This model in detail:

{metrics}"""

# Why the PD model trails AR on this data (what five sessions of measurements found, docs/default_model_v2.md),
# stated where a user of the model reads it; the figures before it are written from the summaries.
WHY_PD_TRAILS = """\
Why it trails: its plans and the text between its rounds are written autoregressively, and it starts
from the AR baseline's weights, but its spans are written by diffusion, which a 2.2 M-parameter model
given under an hour of CPU learns far more slowly than AR learns the same words (five sessions of
checks found this whatever the data shape, attention, topic wording, adaptation stage or model size:
docs/default_model_v2.md). A span must also tell from its position alone which promise is its own; in
rounds of 3-4 spans it often states a neighbour's subject or an invented value."""

WHY_MORE_CALLS = """\
Why it takes more calls on average: the answers of this data are short (one fact of ~8 tokens per span,
while each promise costs 5-7 AR calls), so PD saves calls only on rounds of 3-4 spans with one-word
topics, such as lists of months or numbers; even a perfectly trained PD model would need 1.4x AR's
calls over these held-out answers at steps_ratio 1.0 (`pdjax.synthetic.ideal_calls`). More in
docs/default_model.md."""


def read_yaml(path: str) -> dict:
    """A YAML config as a dict."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def card_configs(folder: str) -> list[str]:
    """The training configs a shipped folder's model card names (stage 1 first), [] without a card."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return re.findall(r"--config (configs/[\w.-]+\.ya?ml)", f.read())


def find_stage1_config(config_path: str, cfg: dict, given: str | None = None) -> str | None:
    """The config whose export `cfg` starts from (``model.checkpoint``); None for a model trained from scratch.

    `given` is checked against it; else the YAML files next to `config_path` are searched for the one whose
    ``checkpoint.export_dir`` is that folder, and a shipped folder (one with a model card) names its own last
    config.
    """
    start = (cfg.get("model") or {}).get("checkpoint")
    if not start:
        return None
    named = card_configs(start)
    if named and not given:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return os.path.join(root, named[-1])
    candidates = [given] if given else sorted(
        os.path.join(os.path.dirname(config_path) or ".", name)
        for name in os.listdir(os.path.dirname(config_path) or ".") if name.endswith((".yaml", ".yml")))
    for path in candidates:
        export = ((read_yaml(path) or {}).get("checkpoint") or {}).get("export_dir")
        if export and os.path.normpath(export) == os.path.normpath(start):
            return path
    where = given or f"the configs next to {config_path}"
    raise SystemExit(f"{config_path} starts from {start}, but {where} has no config exporting it (--stage1_config)")


def last_logged(cfg: dict) -> dict | None:
    """The last line of the run's ``log.dir/metrics.jsonl`` (its final logged step and losses), if it is there."""
    directory = (cfg.get("log") or {}).get("dir")
    path = os.path.join(directory, "metrics.jsonl") if directory else None
    if not path or not os.path.isfile(path):
        return None
    rows = read_jsonl(path)
    return rows[-1] if rows else None


def repo_path(path: str) -> str:
    """`path` relative to the repository root when it lies inside it (as the README's commands name configs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else path


def recipe_line(config_path: str, cfg: dict, label: str = "") -> str:
    """One model-card line: the command, steps of which loss, batch, seed, and the last logged step if logs exist."""
    data = cfg["data"]
    config_path = repo_path(config_path)
    loss = LOSS.get(data["mode"], f"data mode {data['mode']}").format(fill=data.get("eos_fill_length"))
    line = (f"  - {label}`python -m pdjax.train --config {config_path}`: {cfg['steps']} steps of {loss} "
            f"(data mode `{data['mode']}`), batch {data['batch_size']} rows of {data['row_length']} tokens, "
            f"seed {cfg['seed']}")
    logged = last_logged(cfg)
    if logged is not None and "step" in logged:
        losses = ", ".join(f"{k} {logged[k]:.3f}" for k in ("loss", "ar_loss", "diffusion_loss")
                           if isinstance(logged.get(k), (int, float)) and logged[k])
        line += f"; last logged step {logged['step']}" + (f" ({losses})" if losses else "")
    return line + "."


def training_recipe(config_path: str, stage1: str | None = None) -> str:
    """The model card's training lines: one per stage (a shared stage 1 first when the config starts from one)."""
    cfg = read_yaml(config_path)
    base = find_stage1_config(config_path, cfg, stage1)
    if base is None:
        return recipe_line(config_path, cfg)
    start = cfg["model"]["checkpoint"]
    if card_configs(start):  # a shipped model: its bfloat16 weights are stage 2's start
        first = f"stage 1, the shipped model `{start}` (its bfloat16 weights): "
        second = "stage 2, from those weights: "
    else:
        first, second = "stage 1 (shared by the pd, ar and diffusion models): ", "stage 2, from the stage-1 weights: "
    return "\n".join([recipe_line(base, read_yaml(base), first), recipe_line(config_path, cfg, second)])


def metric_lines(metrics: dict | None) -> str:
    """The held-out figures of an `eval --out` summary as model-card lines."""
    if not metrics:
        return "- (not measured)"
    lines = []
    for key in METRIC_KEYS:
        value = metrics.get(key)
        lines.append(f"- {key}: {value if value is None or key == 'model_calls_mean' else f'{value:.3f}'}")
    for shape, split in (metrics.get("by_shape") or {}).items():
        if split.get("fact_accuracy") is not None:
            lines.append(f"- fact_accuracy on {shape} prompts ({split.get('answers')}): {split['fact_accuracy']:.3f}")
    return "\n".join(lines)


def percent(value: float | None) -> str:
    """A share as a model-card percentage ("-" when not measured)."""
    return "-" if value is None else f"{100 * value:.1f} %"


def figures(dst: str, mode: str, summaries: Sequence[dict]) -> str:
    """The card's held-out section: the three models side by side, the PD-AR comparison, this model's details.

    Every summary must have been measured on the shipped folder of its mode next to `dst` (same weights).
    """
    from pdjax.decode.model_info import weights_sha256

    by_mode = {s["mode"]: s for s in summaries}
    if mode not in by_mode:
        raise SystemExit(f"no --metrics summary of mode {mode} for {dst}")
    for kind, summary in by_mode.items():
        folder = dst if kind == mode else os.path.join(os.path.dirname(os.path.normpath(dst)), kind)
        if summary.get("weights_sha256") != weights_sha256(folder):
            raise SystemExit(f"the {kind} summary was measured on other weights than {folder}'s "
                             f"({summary.get('model_dir')}): run eval on {folder}")
        if (summary.get("decode") or {}).get("temperature") != 0 or (summary.get("decode") or {}).get("steps_ratio") != 1.0:
            raise SystemExit(f"the {kind} summary is not greedy at steps_ratio 1.0")
    rows = []
    for kind in KINDS:
        if kind in by_mode:
            m = by_mode[kind]
            name = f"**{kind}** (this model)" if kind == mode else kind
            rows.append(f"| {name} | {m['answers']} | {percent(m['fact_accuracy'])} | {m['model_calls_mean']:.2f} | "
                        f"{percent(m['well_formed'])} | {percent(m['planned'])} |")
    comparison = ""
    if "pd" in by_mode and "ar" in by_mode:
        pd, ar = by_mode["pd"], by_mode["ar"]
        facts = ("trails" if pd["fact_accuracy"] < ar["fact_accuracy"] else "matches or beats")
        calls = ("fewer" if pd["model_calls_mean"] < ar["model_calls_mean"] else "more")
        comparison = (f"The PD model {facts} the AR baseline in facts: it states {percent(pd['fact_accuracy'])} of the "
                      f"held-out facts right against AR's {percent(ar['fact_accuracy'])}, and takes {calls} model calls "
                      f"per answer on average ({pd['model_calls_mean']:.2f} against {ar['model_calls_mean']:.2f}).")
        if pd["fact_accuracy"] < ar["fact_accuracy"]:
            comparison += "\n\n" + WHY_PD_TRAILS
        if pd["model_calls_mean"] >= ar["model_calls_mean"]:
            comparison += "\n\n" + WHY_MORE_CALLS
    decode = by_mode[mode].get("decode") or {}
    masks = (by_mode.get("diffusion", {}).get("decode") or {}).get("diffusion_masks")
    hashes = ", ".join(f"`{by_mode[k]['weights_sha256'][:16]}` ({k})" for k in KINDS if k in by_mode)
    return FIGURES.format(max_length=decode.get("max_length"), masks=masks, table="\n".join(rows), hashes=hashes,
                          comparison=comparison, metrics=metric_lines(by_mode[mode]))


def write_card(dst: str, mode: str, config_path: str, summaries: Sequence[dict] = (),
               stage1_config: str | None = None) -> None:
    """Write the model card README.md of the shipped folder `dst` (its recipe, and figures when summaries are given)."""
    from pdjax.decode.model_info import read_model_info
    from pdjax.model import DreamConfig

    recipe = training_recipe(config_path, stage1_config)
    cfg = read_yaml(config_path)
    masks = read_model_info(dst).max_new_tokens or cfg["data"].get("eos_fill_length")
    text = (figures(dst, mode, summaries) if summaries else
            "Not measured yet: run `eval` on this folder, then `card` (the module docstring of scripts/default_model.py).")
    card = MODEL_CARD.format(
        mode=mode,
        what=WHAT[mode].format(masks=masks),
        params=DreamConfig.from_hf(dst).num_params,
        recipe=recipe,
        rows=len(read_jsonl(os.path.join(dst, "heldout.jsonl"))),
        figures=text,
    )
    with open(os.path.join(dst, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def ship(src: str, dst: str, mode: str, config_path: str, heldout: str, num_heldout: int | None,
         stage1_config: str | None = None) -> None:
    """Write `src` (a trained HF folder) to `dst` in bfloat16 with its tokenizer, held-out prompts and model card."""
    import jax.numpy as jnp

    from pdjax.model import save_pretrained

    training_recipe(config_path, stage1_config)  # refuses before anything is written
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
    write_card(dst, mode, config_path, stage1_config=stage1_config)


def main(argv: Sequence[str] | None = None) -> int:
    """`eval`, `ship` or `card` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="scripts/default_model.py")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("eval", help="decode held-out prompts and score them")
    e.add_argument("model_dir")
    e.add_argument("--heldout", required=True)
    e.add_argument("--mode", choices=("pd", "ar", "diffusion"), default="pd")
    e.add_argument("--num", type=int, default=None)
    e.add_argument("--batch_size", type=int, default=None, help="default: 1 for pd and diffusion, 16 for ar")
    e.add_argument("--max_length", type=int, default=None, help="pd and ar (default 512)")
    e.add_argument("--new_tokens", type=int, default=None, help="diffusion masks (default: the model's own)")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--temperature", type=float, default=0.0)
    e.add_argument("--steps_ratio", type=float, default=1.0, help="pd and diffusion denoising steps per mask")
    e.add_argument("--out", help="write the summary JSON here")
    e.add_argument("--records", help="write one JSON line per prompt here (id, spans, model calls, facts right)")
    s = sub.add_parser("ship", help="re-save a trained folder as a shipped default model")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--mode", choices=("pd", "ar", "diffusion"), required=True)
    s.add_argument("--config", required=True)
    s.add_argument("--heldout", required=True)
    s.add_argument("--num_heldout", type=int, default=None, help="held-out rows shipped (default: all)")
    s.add_argument("--stage1_config", help="the config of the run whose export --config starts from "
                   "(default: found among the configs next to --config)")
    c = sub.add_parser("card", help="write a shipped folder's model card with the held-out figures eval measured on it")
    c.add_argument("dst")
    c.add_argument("--mode", choices=("pd", "ar", "diffusion"), required=True)
    c.add_argument("--config", required=True)
    c.add_argument("--metrics", nargs="+", required=True,
                   help="summary JSONs written by `eval --out` on the shipped folders: this one's, and the others' "
                   "for the side-by-side table")
    c.add_argument("--stage1_config", help="as for ship")
    args = p.parse_args(argv)
    if args.command == "eval":
        rows = read_jsonl(args.heldout, args.num)
        summary = evaluate(args.model_dir, rows, args.mode, batch_size=args.batch_size, temperature=args.temperature,
                           dtype=args.dtype, new_tokens=args.new_tokens, max_length=args.max_length,
                           steps_ratio=args.steps_ratio, records_path=args.records)
        text = json.dumps(summary, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    if args.command == "card":
        summaries = []
        for path in args.metrics:
            with open(path) as f:
                summaries.append(json.load(f))
        write_card(args.dst, args.mode, args.config, summaries, args.stage1_config)
        return 0
    ship(args.src, args.dst, args.mode, args.config, args.heldout, args.num_heldout, args.stage1_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
