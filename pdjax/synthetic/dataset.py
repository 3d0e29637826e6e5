"""Build the default model's data folder: train.jsonl, heldout.jsonl, tokenizer/, stats.json.

The tokenizer is trained on the train split first, because the promise numbers
are span lengths in *its* tokens; BPE merges never touch digits (each digit is
its own pre-token), so the provisional numbers used for training it do not
change how anything else is tokenized.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
from typing import Any, Callable, Mapping, Sequence

from pdjax.model.tokenizer import DEFAULT_SYSTEM_PROMPT, chat_prompt_ids
from pdjax.structure.control import CONTROL_STRINGS
from pdjax.structure.plan import DEFAULT_LENGTH_SCALE
from pdjax.synthetic.chatterbot import chatterbot_pairs
from pdjax.synthetic.generate import generate, render_completion, to_record
from pdjax.synthetic.tasks import Example
from pdjax.synthetic.tokenizer import chatml, save_tokenizer, train_tokenizer

DEFAULT_VOCAB_SIZE = 1536


def tokenizer_corpus(examples: Sequence[Example], split_controls: bool = False) -> list[str]:
    """ChatML texts of the examples (system prompt included) with provisional promise numbers.

    With ``split_controls`` every control string is replaced by a newline. The control tokens are
    added only after BPE training, so otherwise BPE sees e.g. ``>jam`` glued to the tag, learns
    merges that never occur once the tag is its own token, and splits a topic word into pieces
    (the "default" task set keeps the old corpus, so its tokenizer is unchanged).
    """
    texts = []
    for ex in examples:
        completion = render_completion(ex, [[1] * len(r) for r in ex.rounds])
        if split_controls:
            for control in CONTROL_STRINGS.values():
                completion = completion.replace(control, "\n")
        texts.append(chatml(ex.prompt, completion, DEFAULT_SYSTEM_PROMPT))
    return texts


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_dataset(
    out_dir: str | os.PathLike,
    seed: int,
    num_train: int,
    num_heldout: int,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    mix: Mapping[str, float] | None = None,
    length_scale: int = DEFAULT_LENGTH_SCALE,
    chatterbot: bool = False,
    tasks: str = "default",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Generate, train the tokenizer on train, render honest lengths, write everything; return the stats.

    ``chatterbot`` adds plain answers from the chatterbot-corpus package (BSD-3-Clause; must be installed).
    ``tasks`` picks the task set ("default", or "paper": the paper's long-span shape); ``mix``
    defaults to that set's shape shares. ``log`` gets a line as each step starts (a 20,000-example
    build takes 10-30 s).
    """
    log = log or (lambda _line: None)
    pairs = chatterbot_pairs() if chatterbot else ()
    log(f"drawing {num_train:,} train and {num_heldout:,} held-out questions (tasks {tasks}, seed {seed}) ...")
    train, heldout = generate(seed, num_train, num_heldout, mix, plain_pairs=pairs, tasks=tasks)
    log(f"training the BPE tokenizer ({vocab_size:,} tokens) on the train answers ...")
    tokenizer = train_tokenizer(tokenizer_corpus(train, split_controls=tasks != "default"), vocab_size=vocab_size)
    log("writing train.jsonl, heldout.jsonl, the tokenizer and stats.json ...")
    os.makedirs(out_dir, exist_ok=True)
    save_tokenizer(tokenizer, os.path.join(out_dir, "tokenizer"))
    splits = {
        "train": [to_record(ex, tokenizer, f"train-{i:06d}", length_scale) for i, ex in enumerate(train)],
        "heldout": [to_record(ex, tokenizer, f"heldout-{i:06d}", length_scale) for i, ex in enumerate(heldout)],
    }
    for name, rows in splits.items():
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), rows)
    stats = {
        "seed": seed,
        **({"tasks": tasks} if tasks != "default" else {}),  # the default data's stats stay as they were
        "chatterbot": chatterbot,
        "vocab_size": len(tokenizer),
        "length_scale": length_scale,
        **{name: dataset_stats(rows, tokenizer) for name, rows in splits.items()},
    }
    if tasks != "default":  # the default data's stats stay as they were
        stats["ideal_ar_over_pd_calls"] = ideal_call_ratio(splits["heldout"], tokenizer)
    with open(os.path.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return stats


def _describe(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 2),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def ideal_calls(response: Sequence[int], ids: Any, steps_ratio: float = 1.0) -> tuple[int, int]:
    """(AR calls, PD calls) an ideal decoder needs for this annotated response (ids end with `<|im_end|>`).

    AR writes every token of the answer without its plan (+ `<|im_end|>`). PD writes each planned
    round's promises token by token, then denoises its spans in int(max promised length * steps_ratio)
    steps (METHOD §4), and writes everything outside planned rounds (plain text, `<sync/>`,
    `<|im_end|>`) token by token. The ratio bounds the speed-up a perfectly trained PD model can show.
    """
    from pdjax.structure import parse_response, strip_plan

    parsed = parse_response(list(response), ids)
    ar = len(strip_plan(list(response), ids))
    pd = len(response)
    for rnd in parsed.rounds:
        if rnd.is_plain:
            continue
        pd -= sum(s.end - s.start + 1 for s in rnd.spans)
        pd += int(max(p.length for p in rnd.promises) * steps_ratio)
    return ar, pd


def ideal_call_ratio(rows: Sequence[Mapping], tokenizer: Any, ratios: Sequence[float] = (1.0, 0.5)) -> dict[str, float]:
    """AR calls / PD calls of an ideal decoder over `rows` (ratio of the sums), per steps_ratio.

    The bound a perfectly trained PD model can reach on this data: the benchmark's "AR calls / PD
    calls" cannot exceed it (much).
    """
    from pdjax.structure import ControlIds

    ids = ControlIds.from_tokenizer(tokenizer)
    responses = [tokenizer.encode(r["completion"], add_special_tokens=False) + [ids.eos] for r in rows]
    out = {}
    for ratio in ratios:
        calls = [ideal_calls(resp, ids, ratio) for resp in responses]
        pd = sum(c[1] for c in calls)
        out[f"steps_ratio_{ratio}"] = round(sum(c[0] for c in calls) / pd, 3) if pd else None
    return out


def dataset_stats(rows: Sequence[Mapping], tokenizer: Any) -> dict:
    """Counts per shape and family, spans and rounds per example, span and example lengths in tokens."""
    from pdjax.structure import ControlIds, parse_response

    ids = ControlIds.from_tokenizer(tokenizer)
    span_tokens: list[int] = []
    numbers: collections.Counter[int] = collections.Counter()
    spans_per_example: list[int] = []
    rounds_per_example: list[int] = []
    example_tokens: list[int] = []
    answer_tokens: list[int] = []
    for row in rows:
        prompt = chat_prompt_ids(tokenizer, row["prompt"])
        response = tokenizer.encode(row["completion"], add_special_tokens=False) + [ids.eos]
        parsed = parse_response(response, ids)
        example_tokens.append(len(prompt) + len(response))
        answer_tokens.append(len(tokenizer.encode(row["answer"], add_special_tokens=False)) + 1)
        if parsed.promises:
            spans_per_example.append(len(parsed.spans))
            rounds_per_example.append(len(parsed.rounds))
        for span in parsed.spans:
            span_tokens.append(span.end - span.start - 1)
        numbers.update(p.number for p in parsed.promises)
    return {
        "examples": len(rows),
        "shapes": dict(sorted(collections.Counter(r["shape"] for r in rows).items())),
        "families": dict(sorted(collections.Counter(r["family"] for r in rows).items())),
        "spans_per_planned_example": _describe(spans_per_example),
        "rounds_per_planned_example": _describe(rounds_per_example),
        "span_tokens": _describe(span_tokens),
        "promise_numbers": dict(sorted(numbers.items())),
        "tokens_per_example": _describe(example_tokens),
        "answer_tokens_without_plan": _describe(answer_tokens),
    }
