"""Reading JSON Lines and JSON files line by line, so that every bad line is named by its file and 1-based line.

`read_jsonl` never raises on content: each line comes back as its value or as a
`LineError` (not UTF-8, empty, not JSON) for the caller to skip and count
(training data). `read_records` reads a ``.json`` file (a list of records) or
a ``.jsonl`` file (one record per line) and raises `LineError` at the first bad
record (prompt, outputs and annotations files).
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


def json_array_items(path: str | os.PathLike, *, jsonl_fallback: bool = True) -> list[Any] | None:
    """The items of a file holding one JSON array.

    With ``jsonl_fallback`` (training data, where Hugging Face reads a .json
    file of one object per line as JSONL) a file that is not one JSON value, or
    one object on one line, gives None: read it as JSONL. Otherwise, and for any
    other top-level value, it raises `LineError` naming the line.
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
        if text.lstrip().startswith("[") or not jsonl_fallback:
            raise LineError(path, e.lineno, "not-json", f"not JSON ({e.msg} at column {e.colno})") from None
        return None
    except RecursionError:
        raise LineError(path, 1, "not-json", "not JSON (nested too deeply)") from None
    if isinstance(value, list):
        return value
    if jsonl_fallback and isinstance(value, dict) and text.strip().count("\n") == 0:
        return None  # one object on one line: a one-record JSONL file
    raise LineError(
        path, 1, "not-a-list", f"a .json file must hold a list of records, not {article(value)} "
        "(write one record per line as .jsonl)"
    )  # fmt: skip


def article(value: Any) -> str:
    """'an int', 'a string', 'an object': the JSON-ish type of `value` with its article (for messages)."""
    if value is None:
        return "null"
    name = {"dict": "object", "list": "list", "str": "string"}.get(type(value).__name__, type(value).__name__)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def where(path: str | os.PathLike, number: int, unit: str) -> str:
    """``path:line`` for a JSONL line, ``path item N`` for an item of a JSON list."""
    return f"{path}:{number}" if unit == "line" else f"{path} item {number}"


def read_records(path: str | os.PathLike, *, what: str = "record", objects: bool = True) -> list[tuple[str, Any]]:
    """(location, value) of every record of a file; raises `LineError` (a `UserError`) at the first bad one.

    ``.json``: one JSON list (a top-level object is an error). ``.jsonl``: one
    record per line, blank lines allowed. Other names: a list if the file starts
    with ``[``, else JSONL. With ``objects`` every record must be a JSON object.
    The location is ``path:line`` (JSONL) or ``path item N`` (a list), 1-based.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".json" or suffix != ".jsonl" and _starts_with_bracket(path):
        items = json_array_items(path, jsonl_fallback=False)
        numbered = [(n, "item", v) for n, v in enumerate(items or [], 1)]
    else:
        numbered = []
        for n, value in read_jsonl(path):
            if isinstance(value, LineError):
                if value.rule == "empty-line":
                    continue
                raise value
            numbered.append((n, "line", value))
    if objects:
        for n, unit, value in numbered:
            if not isinstance(value, dict):
                raise LineError(path, n, "not-an-object", f"{what} is {article(value)}, not an object", unit=unit)
    return [(where(path, n, unit), value) for n, unit, value in numbered]


def _starts_with_bracket(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")
