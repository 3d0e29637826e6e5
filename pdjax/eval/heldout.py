"""Decode held-out synthetic prompts with the default models, and score the answers.

One place for the decode programs behind `scripts/default_model.py eval` (the model cards'
figures) and `benchmarks/critical_path.py` (the tables of docs/performance.md), so both measure the same thing.
The programs are chosen for a compute-bound CPU, and none of the choices changes an answer
(greedy answers are token for token those of any other batch size or bucket set):

- batch 1 for pd and diffusion: a batched call is as wide as its widest row, so in a batch a
  row that takes a plan step pays for a neighbour's denoising window; on 2 CPU cores batch 1
  decodes PD ~3x faster than batch 16. AR rows are all one token wide and batch well.
- finer window buckets for pd (every 32 tokens to 256, then every 64) instead of powers of
  two: a 3-4 span group of ~200 tokens is no longer padded to 256 (or a 260-token one to 512).
- diffusion: the cache as long as the longest prompt plus the masks, and a bucket of exactly
  masks + 1 (the anchor and the masks), not ``max_length`` (~2.5x faster for 288 masks).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any, Sequence

from pdjax.decode import DecodeConfig, DecodeOptions
from pdjax.decode.model_info import read_model_info
from pdjax.eval.prompts import Prompt, prompts_from_rows
from pdjax.eval.runner import EvalModel, decode_prompts, load_eval_model

PD_MAX_LENGTH = 512  # prompt + plan + answer: paper-shaped prompts ~60 tokens, answers with their plans < 450
AR_BATCH_SIZE = 16  # AR calls are one token wide: batching them costs little per row


def fine_buckets(max_length: int) -> tuple[int, ...]:
    """Window widths 32, 48, 64, every 32 up to 256, then every 64 below max_length (padding <= 1/3, mostly < 1/5)."""
    sizes = [32, 48, 64] + list(range(96, 257, 32)) + list(range(320, max_length, 64))
    return tuple(s for s in sizes if s < max_length)


def diffusion_masks(model_dir: str | os.PathLike, override: int | None = None) -> int:
    """The masks a diffusion model decodes: `override`, else its generation_config.json's max_new_tokens."""
    return override if override is not None else read_model_info(model_dir).diffusion_masks


def decode_config(mode: str, *, max_length: int = PD_MAX_LENGTH, batch_size: int | None = None,
                  masks: int | None = None, longest_prompt: int | None = None, profile: bool = False) -> DecodeConfig:
    """The program `mode` decodes held-out prompts with (see the module docstring).

    ``diffusion`` needs ``masks`` and ``longest_prompt`` (tokens): its max_length is their sum.
    """
    if mode == "ar":
        return DecodeConfig("ar", max_length=max_length, batch_size=batch_size or AR_BATCH_SIZE, profile=profile)
    if mode == "pd":
        return DecodeConfig("pd", max_length=max_length, batch_size=batch_size or 1, buckets=fine_buckets(max_length),
                            profile=profile)
    if mode == "diffusion":
        if masks is None or longest_prompt is None:
            raise ValueError("diffusion needs the mask count and the longest prompt's length")
        window = masks + 1  # the anchor (the prompt's last token) and the masks
        buckets = tuple(2**p for p in range(5, 31) if 2**p < window) + (window,)
        return DecodeConfig("diffusion", max_length=longest_prompt + masks, batch_size=batch_size or 1,
                            buckets=buckets, profile=profile)
    raise ValueError(f"unknown mode {mode!r}")


def load_heldout_model(path: str | os.PathLike, mode: str, prompts: Sequence[Prompt], *,
                       max_length: int = PD_MAX_LENGTH, batch_size: int | None = None, masks: int | None = None,
                       profile: bool = False, dtype: str = "float32", quantize: str | None = None) -> EvalModel:
    """An `EvalModel` of `path` with `decode_config(mode)`, sized for `prompts` (diffusion: longest + masks);
    ``quantize`` (int8, int4) quantizes its weights as they load."""
    model = load_eval_model(str(path), DecodeConfig(mode=mode, max_length=max_length), dtype=dtype, quantize=quantize)
    longest = max(len(model.encode(p.instruction)) for p in prompts) if prompts else 1
    config = decode_config(mode, max_length=max_length, batch_size=batch_size, masks=masks, longest_prompt=longest,
                           profile=profile)
    return EvalModel(model.model, model.tokenizer, config, chat_template=model.chat_template,
                     system_prompt=model.system_prompt, name=model.name)


def decode_options(mode: str, *, steps_ratio: float = 1.0, threshold: float | None = None, masks: int | None = None,
                   temperature: float = 0.0, top_p: float | None = None, seed: int = 0) -> DecodeOptions:
    """Decode options of one setting; diffusion decodes exactly `masks` masks (the model's fill length)."""
    if temperature > 0 and top_p is None:
        top_p = 0.95
    return DecodeOptions(steps_ratio=steps_ratio, confidence_threshold=threshold, temperature=temperature,
                         top_p=top_p if temperature > 0 else None, seed=seed,
                         max_new_tokens=masks if mode == "diffusion" else None)


def heldout_prompts(rows: Sequence[dict]) -> list[Prompt]:
    """Prompts of held-out rows (their `prompt` field), in order."""
    return prompts_from_rows([r["prompt"] for r in rows], "heldout")


def decode_and_score(model: EvalModel, rows: Sequence[dict], options: DecodeOptions) -> dict[str, Any]:
    """Decode `rows` and score them: summary (`pdjax.synthetic.summarize`), calls, seconds, records, checks.

    ``seconds`` is the decoder's wall time summed over the batches (each record's batch latency over
    the batch's size): a model's first decode compiles its program in an untimed warm-up
    (`pdjax.eval.runner`), which it leaves out.
    """
    from pdjax.synthetic import check_completion, summarize

    records = decode_prompts(model, heldout_prompts(rows), options)
    seconds = sum(rec["latency_s"] / rec["batch_fill"] for rec in records)
    checks = [check_completion(r["facts"], rec["token_ids"], model.tokenizer) for r, rec in zip(rows, records)]
    summary = summarize(checks)
    return {
        "summary": summary,
        "calls": statistics.fmean(rec["model_calls"] for rec in records),
        "seconds": seconds,
        "s_per_prompt": seconds / max(len(rows), 1),
        "records": records,
        "checks": checks,
    }


def per_call_seconds(model: EvalModel, rows: Sequence[dict], options: DecodeOptions) -> dict[str, dict[str, float]]:
    """Wall seconds per model call of each kind (prefill, plan = an AR step, denoise, commit) over `rows`.

    Decodes them one at a time with the decoder's profiler (host timestamps after every call, exact
    at batch 1 where a call serves one kind); a separate program, compiled here and not timed.
    """
    profiled = with_config(model, profile=True, batch_size=1)
    prompts = [profiled.encode(r["prompt"]) for r in rows]
    profiled.decoder.compile(None, options)
    totals: dict[str, list[float]] = {}
    for result in profiled.decoder.generate(prompts, options):
        s = result.stats
        calls = {"prefill": s.prefill_calls, "plan": s.plan_calls, "denoise": s.denoise_calls, "commit": s.commit_calls}
        for kind, seconds in (s.phase_time_s or {}).items():
            if calls[kind]:
                t = totals.setdefault(kind, [0.0, 0])
                t[0] += seconds
                t[1] += calls[kind]
    return {k: {"calls": int(n), "s_per_call": sec / n} for k, (sec, n) in totals.items()}


def with_config(model: EvalModel, **changes: Any) -> EvalModel:
    """The same model and tokenizer under a changed `DecodeConfig` (a new program; nothing is reloaded)."""
    return EvalModel(model.model, model.tokenizer, dataclasses.replace(model.config, **changes),
                     chat_template=model.chat_template, system_prompt=model.system_prompt, name=model.name)
