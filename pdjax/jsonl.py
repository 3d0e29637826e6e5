"""Reading JSON Lines and JSON files line by line, so that every bad line is named by its file and 1-based line.

`read_jsonl` never raises on content: each line comes back as its value or as a
`LineError` (not UTF-8, empty, not JSON) for the caller to skip and count
(training data) or to report (prompt files). `read_json_records` reads a
``.json`` file (a list of objects) or a ``.jsonl`` file (one object per line)
and raises `LineError` at the first bad record.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from pdjax.cli_errors import UserError


class LineError(UserError, ValueError):
    """A line (or item) of a JSON / JSONL file that gives no record: `rule` names what is wrong."""

    def __init__(self, path: str | os.PathLike, line: int, rule: str, detail: str, *, unit: str = "line"):
        self.path = str(path)
        self.line = int(line)
        self.rule = rule
        self.detail = detail
        self.unit = unit
        where = f"{self.path}:{self.line}" if unit == "line" else f"{self.path} item {self.line}"
        super().__init__(f"{where}: {detail}")


def decode_line(path: str | os.PathLike, line_no: int, raw: bytes) -> Any:
    """The JSON value of one raw line; raises `LineError` ('not-utf8', 'empty-line' or 'not-json')."""
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise LineError(path, line_no, "not-utf8", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    if not text.strip():
        raise LineError(path, line_no, "empty-line", "empty line")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(path, line_no, "not-json", f"not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise LineError(path, line_no, "not-json", "not JSON (nested too deeply)") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(1-based line, value or `LineError`) for every line of a JSONL file; a final newline adds no line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, decode_line(path, line_no, raw)
            except LineError as err:
                yield line_no, err


def json_array_items(path: str | os.PathLike) -> list[Any] | None:
    """The items of a ``.json`` file holding one JSON array, or None when the file is not one JSON value.

    A file that parses as a single non-array value raises `LineError` (a top-level
    object is not a list of records: one object per line is JSONL).
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LineError(path, line, "not-utf8", f"not UTF-8 (byte 0x{data[e.start]:02x})") from None
    if not text.strip():
        raise LineError(path, 1, "empty-file", "the file is empty")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise LineError(path, e.lineno, "not-json", f"not JSON ({e.msg} at column {e.colno})") from None
        return None
    except RecursionError:
        raise LineError(path, 1, "not-json", "not JSON (nested too deeply)") from None
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and text.strip().count("\n") == 0:
        return None  # one object on one line: a one-record JSONL file
    raise LineError(
        path, 1, "not-a-list", f"a .json file must hold a list of objects, not a {type(value).__name__} "
        "(write one object per line as .jsonl)"
    )


def read_json_records(path: str | os.PathLike, *, what: str = "record") -> list[tuple[int, dict]]:
    """(1-based line or item, object) of every record of a .json (list) or .jsonl file; raises `LineError`.

    Blank lines of a JSONL file are allowed; anything else that is not a JSON
    object is an error naming the file and the line (the item, in a list).
    """
    if str(path).lower().endswith(".json"):
        items = json_array_items(path)
        if items is not None:
            for i, item in enumerate(items, 1):
                if not isinstance(item, dict):
                    raise LineError(path, i, "not-an-object", f"{what} is a {type(item).__name__}, not an object",
                                    unit="item")  # fmt: skip
            return list(enumerate(items, 1))
    records = []
    for line_no, value in read_jsonl(path):
        if isinstance(value, LineError):
            if value.rule == "empty-line":
                continue
            raise value
        if not isinstance(value, dict):
            raise LineError(path, line_no, "not-an-object", f"{what} is a {type(value).__name__}, not an object")
        records.append((line_no, value))
    return records
