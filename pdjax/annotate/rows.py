"""Input rows and the append-only JSONL files of the annotators (output and report of discarded rows)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterator, Mapping

from pdjax.jsonl import LineError, read_jsonl


@dataclasses.dataclass(frozen=True)
class Row:
    """One (prompt, response) pair; `id` is the input's `id` field or a hash of the pair (stable across runs)."""

    id: str
    index: int
    prompt: str
    response: str


def row_id(row: Mapping, prompt: str, response: str) -> str:
    if row.get("id") is not None:
        return str(row["id"])
    return hashlib.sha1(json.dumps([prompt, response]).encode()).hexdigest()[:16]


def read_rows(
    path: str | os.PathLike, prompt_field: str = "prompt", response_field: str = "response", *, limit: int | None = None
) -> Iterator[Row]:
    """Rows of a JSONL file (blank lines ignored); a bad line raises `LineError` naming the file and 1-based line."""
    index = 0
    for line_no, row in read_jsonl(path):
        if isinstance(row, LineError):
            if row.rule == "empty-line":
                continue
            raise row
        if limit is not None and index >= limit:
            return
        if not isinstance(row, dict):
            raise LineError(path, line_no, "not-an-object", f"a row must be a JSON object, not {type(row).__name__}")
        prompt, response = row.get(prompt_field), row.get(response_field)
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise LineError(
                path, line_no, "bad-fields",
                f"needs string fields {prompt_field!r} and {response_field!r} (got "
                + ", ".join(f"{k}: {type(v).__name__}" for k, v in row.items())
                + "); choose them with --prompt_field / --response_field",
            )  # fmt: skip
        yield Row(row_id(row, prompt, response), index, prompt, response)
        index += 1


def _repair_tail(path: str | os.PathLike) -> None:
    """Cut a last line left half-written by an interrupted run, so appends start on a fresh line."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def finished_ids(path: str | os.PathLike) -> set[str]:
    """The ids already present in an output or report file (none if it does not exist)."""
    if not os.path.exists(path):
        return set()
    _repair_tail(path)
    ids = set()
    for line_no, row in read_jsonl(path):
        if isinstance(row, LineError):
            if row.rule == "empty-line":
                continue
            raise LineError(path, line_no, row.rule, f"{row.detail}; fix or delete the line to resume")
        if not isinstance(row, dict) or "id" not in row:
            raise LineError(path, line_no, "no-id", "a finished row needs an 'id'; fix or delete the line to resume")
        ids.add(str(row["id"]))
    return ids


def append_jsonl(path: str | os.PathLike, row: Mapping) -> None:
    """Append one row and flush it to disk, so a crash never loses a finished row."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
