"""Reading rows: Hugging Face datasets or local JSON / JSONL / Parquet, and the turns of one row.

A row gives one (prompt, completion) pair, either from ``prompt`` /
``completion`` columns (the released reference's format) or from chat
``messages``: the last assistant turn is the completion and the user turn
before it the prompt. A row that cannot give a pair raises `RowError`, which
the pipeline reports and skips.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping

from pdjax.data.config import DataConfig
from pdjax.data.synthetic_source import ensure_synthetic, is_synthetic

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class RowError(ValueError):
    """A source row that gives no usable (prompt, completion) pair."""

    def __init__(self, rule: str, detail: str):
        self.rule = rule
        self.detail = detail
        super().__init__(f"{rule}: {detail}")


def local_files(source: str) -> list[str] | None:
    """The data files `source` names (comma-separated paths or globs), or None if it names none."""
    parts = [p.strip() for p in source.split(",") if p.strip()]
    files: list[str] = []
    for part in parts:
        matches = sorted(glob.glob(os.path.expanduser(part)))
        if not matches or not all(os.path.isfile(m) for m in matches):
            return None
        files += matches
    return files or None


def prepare_source(config: DataConfig, log: Any = print) -> None:
    """Make a generated source exist before anything reads it (a ``synthetic:`` folder: data and tokenizer)."""
    if is_synthetic(config.source):
        ensure_synthetic(config.source, log=log)


def load_source(config: DataConfig) -> Any:
    """The whole split as a `datasets.Dataset` (hub name, local folder, local data files, or ``synthetic:``)."""
    import datasets

    if is_synthetic(config.source):
        files = [ensure_synthetic(config.source, log=None).file(config.split)]
        return datasets.load_dataset("json", data_files=files, split="train", cache_dir=config.cache_dir)
    files = local_files(config.source)
    if files is not None:
        kinds = {LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(
                f"local data files must all be .json/.jsonl or all .parquet, got {files}"
            )
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train", cache_dir=config.cache_dir)
    return datasets.load_dataset(config.source, split=config.split, cache_dir=config.cache_dir)


def resolve_format(columns: list[str], config: DataConfig) -> str:
    """'prompt_completion' or 'messages', checked against the dataset's columns."""
    pair = (config.prompt_column, config.completion_column)
    has_pair = all(c in columns for c in pair)
    has_messages = config.messages_column in columns
    fmt = config.format
    if fmt == "auto":
        fmt = "prompt_completion" if has_pair else "messages" if has_messages else ""
    if fmt == "prompt_completion" and has_pair or fmt == "messages" and has_messages:
        return fmt
    wanted = {
        "prompt_completion": f"columns {pair[0]!r} and {pair[1]!r}",
        "messages": f"a column {config.messages_column!r}",
        "": f"columns {pair[0]!r} and {pair[1]!r}, or a column {config.messages_column!r}",
    }[fmt]
    raise ValueError(
        f"{config.source}: the dataset has columns {columns}, but format {config.format!r} needs {wanted}; "
        "name yours with DataConfig.prompt_column / completion_column / messages_column"
    )


def host_range(num_rows: int, shard_index: int, shard_count: int) -> range:
    """The contiguous block of source rows host `shard_index` of `shard_count` reads."""
    per, extra = divmod(num_rows, shard_count)
    start = shard_index * per + min(shard_index, extra)
    return range(start, start + per + (shard_index < extra))


def _text(value: Any, what: str) -> str:
    if value is None:
        raise RowError(f"empty-{what}", f"the {what} is missing")
    if not isinstance(value, str):
        raise RowError("not-text", f"{what} is {type(value).__name__}, not a string")
    if not value.strip():
        raise RowError(f"empty-{what}", f"the {what} is empty")
    return value


def row_turns(row: Mapping[str, Any], fmt: str, config: DataConfig) -> tuple[str, str]:
    """(prompt, completion) of one row; raises `RowError` when the row gives none."""
    if fmt == "prompt_completion":
        return _text(row[config.prompt_column], "prompt"), _text(row[config.completion_column], "completion")
    messages = row[config.messages_column]
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise RowError("bad-messages", "messages must be a list of {role, content} objects")
    roles = [m.get("role") for m in messages]
    if "assistant" not in roles:
        raise RowError("no-assistant-turn", f"roles are {roles}")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    if "user" not in roles[:last]:
        raise RowError("no-user-turn", f"no user turn before the last assistant turn (roles {roles})")
    user = last - 1 - roles[:last][::-1].index("user")
    return _text(messages[user].get("content"), "prompt"), _text(messages[last].get("content"), "completion")
