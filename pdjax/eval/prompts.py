"""The instructions to answer: AlpacaEval's 805 prompts, or any local JSON/JSONL file, and each shard's slice.

A local ``.json`` file is a list of prompts (strings or objects); a ``.jsonl``
file has one per line. Every error names the file and the 1-based line (item).

AlpacaEval's evaluation set is the JSON file of the Hugging Face dataset
``tatsu-lab/alpaca_eval`` (fields ``instruction``, ``output``, ``generator``,
``dataset``); it is read with `datasets`' JSON loader, because current
`datasets` no longer runs the repository's loading script.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence

from pdjax.cli_errors import UserError
from pdjax.jsonl import LineError, article, read_records

ALPACA_EVAL = "alpaca_eval"
ALPACA_EVAL_URL = "https://huggingface.co/datasets/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json"
INSTRUCTION_KEYS = ("instruction", "prompt")  # pdjax.synthetic's held-out rows call it "prompt"


class PromptError(UserError, ValueError):
    """The prompts cannot be read (no network for AlpacaEval, a malformed file)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One instruction to answer; ``index`` is its position in the full prompt list (the key for resume)."""

    index: int
    instruction: str
    dataset: str


def _rows_from_file(path: str) -> list[tuple[str, Any]]:
    """(location, row) of a prompts file: a .json list or .jsonl lines (`pdjax.jsonl.read_records`)."""
    try:
        return read_records(path, what="a prompt row", objects=False)
    except LineError as e:
        raise PromptError(str(e)) from None


def _alpaca_eval_rows() -> list[Any]:
    from datasets import load_dataset

    try:
        return list(load_dataset("json", data_files=ALPACA_EVAL_URL, split="train"))
    except Exception as e:  # offline, blocked, or the file moved: say what to do instead
        raise PromptError(
            f"could not load AlpacaEval from {ALPACA_EVAL_URL} ({type(e).__name__}: {e}); "
            "without network, download alpaca_eval.json elsewhere and pass it with --prompts PATH"
        ) from e


def prompts_from_rows(rows: Sequence[Any], default_dataset: str, where: Sequence[str] | None = None) -> list[Prompt]:
    """Prompts from rows that are strings or dicts with ``instruction`` (or ``prompt``) and an optional ``dataset``.

    ``where`` names each row's place for errors (``file:line``); default ``prompt row i``.
    """
    prompts = []
    for i, row in enumerate(rows):
        at = where[i] if where is not None else f"prompt row {i}"
        if isinstance(row, str):
            prompts.append(Prompt(i, row, default_dataset))
            continue
        if not isinstance(row, dict):
            raise PromptError(f"{at}: a prompt row is {article(row)}; expected a string or an object")
        key = next((k for k in INSTRUCTION_KEYS if k in row), None)
        if key is None:
            raise PromptError(f"{at}: none of the fields {INSTRUCTION_KEYS} (has {sorted(row)[:8]})")
        if not isinstance(row[key], str):
            raise PromptError(f"{at}: field {key!r} is {article(row[key])}, not a string")
        prompts.append(Prompt(i, row[key], str(row.get("dataset") or default_dataset)))
    return prompts


def load_prompts(source: str = ALPACA_EVAL, num_samples: int | None = None) -> list[Prompt]:
    """The first `num_samples` prompts (all when None) of AlpacaEval (``"alpaca_eval"``) or of a local JSON/JSONL file."""
    if source == ALPACA_EVAL and not os.path.exists(source):
        prompts = prompts_from_rows(_alpaca_eval_rows(), ALPACA_EVAL)
    else:
        if not os.path.isfile(source):
            raise PromptError(f"--prompts {source}: no such file (or pass alpaca_eval)")
        stem = os.path.splitext(os.path.basename(source))[0]
        located = _rows_from_file(source)
        prompts = prompts_from_rows([r for _, r in located], stem, [w for w, _ in located])
    if not prompts:
        raise PromptError(f"no prompts in {source}")
    return prompts if num_samples is None else prompts[:num_samples]


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    """A hash of the instructions in order: a resumed run must answer the same prompts."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.instruction.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def shard_of(prompts: Sequence[Prompt], shard_index: int, num_shards: int) -> list[Prompt]:
    """Shard `shard_index` of `num_shards`: every num_shards-th prompt (strided, so shards get similar lengths)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    return [p for p in prompts if p.index % num_shards == shard_index]
