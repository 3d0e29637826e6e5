"""Incremental, resumable outputs: JSONL part files written batch by batch, assembled into one JSON list.

For ``--output OUT.json`` the work lives in ``OUT.json.parts/``: ``run.json``
(the settings that fix the answers) and one ``*.jsonl`` file per worker, to
which each finished batch is appended and flushed to disk. A resumed run
reads every part file, skips the prompt indices already there and appends the
rest; a line cut short by a crash is dropped (and cut off before appending),
so no finished sample is lost or written twice. ``OUT.json`` is written once
every index is present: alpaca_eval's outputs format, a JSON list in prompt
order, one record per line.

alpaca_eval drops duplicate rows by hashing every field, so a list-valued field
stops it ("unhashable type: 'list'"). ``OUT.json`` therefore holds scalars and
strings only: the per-sample id lists (``token_ids``, ``span_lengths``) are
written as space-separated strings ("12 7 9") and `read_outputs` turns them
back into lists; any other non-scalar value is written as its JSON text.
Outputs written before this (with JSON lists) are still read; `assemble`
rewrites them from their part files in the new form.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import threading
from typing import Any, Iterable, Mapping, Sequence

from pdjax.cli_errors import UserError

RUN_FILE = "run.json"
ID_LIST_FIELDS = ("token_ids", "span_lengths")  # list[int] in memory, "1 2 3" in OUT.json


class FormatError(UserError, ValueError):
    """A file is not what it should be (a damaged part file, not an outputs or annotations file)."""


class SettingsMismatch(ValueError):
    """The output already holds answers made with other settings."""


def parts_dir(output: str) -> str:
    """The folder of `output`'s part files."""
    return output + ".parts"


def _read_lines(path: str) -> tuple[list[dict[str, Any]], int]:
    """(records, byte length of the complete lines) of one part file; a cut-off last line is dropped."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(data[:end].splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}: line {n + 1} is not JSON ({e}); the part file is damaged") from e
    return records, end


class PartWriter:
    """Appends records to one part file, one flushed and fsynced write per batch."""

    def __init__(self, path: str):
        if os.path.exists(path):
            _, end = _read_lines(path)
            with open(path, "r+b") as f:
                f.truncate(end)  # a crash may have left half a line
        self._file = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append `records` durably (the whole batch in one write)."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass
class Assembly:
    """What assembling found: the records in index order, indices still missing, duplicates dropped."""

    records: list[dict[str, Any]]
    missing: list[int]
    duplicates: int


class OutputStore:
    """The part files of one output; refuses to mix answers made with different settings."""

    def __init__(self, output: str, settings: Mapping[str, Any], total: int, *, overwrite: bool = False):
        self.output = output
        self.dir = parts_dir(output)
        self.total = total
        self._lock = threading.Lock()
        if overwrite:
            clear_output(output)
        os.makedirs(self.dir, exist_ok=True)
        run = {"settings": dict(settings), "total": total}
        path = os.path.join(self.dir, RUN_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old != json.loads(json.dumps(run)):
                raise SettingsMismatch(self._mismatch(old, run))
        else:
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(run, f, indent=2, sort_keys=True)
            os.replace(tmp, path)

    @classmethod
    def existing(cls, output: str) -> "OutputStore":
        """The store of an earlier run (its settings read back from run.json)."""
        path = os.path.join(parts_dir(output), RUN_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: no run wrote {output} here")
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        return cls(output, run["settings"], run["total"])

    def _mismatch(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
        a = {**old.get("settings", {}), "total": old.get("total")}
        b = {**json.loads(json.dumps(new["settings"])), "total": new["total"]}
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return (
            f"{self.dir} holds answers made with other settings ({'; '.join(diff)}); "
            "pass --overwrite to start again, or another --output"
        )

    def part_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, "*.jsonl")))

    def finished(self) -> dict[int, dict[str, Any]]:
        """Every finished record by prompt index (the first one when an index appears twice)."""
        return self._collect()[0]

    def _collect(self) -> tuple[dict[int, dict[str, Any]], int]:
        done: dict[int, dict[str, Any]] = {}
        duplicates = 0
        for path in self.part_files():
            for r in _read_lines(path)[0]:
                if r["index"] in done:
                    duplicates += 1
                else:
                    done[r["index"]] = r
        return done, duplicates

    def writer(self, name: str) -> PartWriter:
        """The part file `name` (e.g. one per process and worker), opened for appending."""
        return PartWriter(os.path.join(self.dir, f"{name}.jsonl"))

    def assemble(self) -> Assembly:
        """Write the output JSON if every index 0..total-1 is finished; report what is missing otherwise."""
        with self._lock:
            done, duplicates = self._collect()
            missing = [i for i in range(self.total) if i not in done]
            records = [done[i] for i in range(self.total) if i in done]
            if not missing:
                write_outputs(self.output, records)
            return Assembly(records, missing, duplicates)


def clear_output(output: str) -> None:
    """Remove `output` and its part files (to start again)."""
    shutil.rmtree(parts_dir(output), ignore_errors=True)
    if os.path.exists(output):
        os.remove(output)


def alpaca_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` with scalar or string values only (what alpaca_eval can hash): id lists as "1 2 3", other
    lists and dicts as JSON text."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in ID_LIST_FIELDS and isinstance(value, (list, tuple)):
            value = " ".join(str(int(v)) for v in value)
        elif isinstance(value, (list, tuple, dict)):
            value = json.dumps(value, ensure_ascii=False)
        out[key] = value
    return out


def _from_alpaca(record: dict[str, Any], path: str) -> dict[str, Any]:
    for key in ID_LIST_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            try:
                record[key] = [int(v) for v in value.split()]
            except ValueError as e:
                raise FormatError(f"{path}: `{key}` of record {record.get('index')} is not space-separated ids") from e
    return record


def write_outputs(path: str, records: Sequence[Mapping[str, Any]]) -> None:
    """A JSON list with one record per line (scalars and strings only, see `alpaca_record`), written atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(alpaca_record(r), ensure_ascii=False) for r in records) + "\n]\n")
    os.replace(tmp, path)


def read_outputs(path: str) -> list[dict[str, Any]]:
    """Records of an outputs file: a JSON list (alpaca_eval's format) or JSONL; id lists come back as lists.

    Files of earlier pdjax versions (id lists stored as JSON lists) read the same.
    """
    from pdjax.jsonl import LineError, read_records

    try:
        located = read_records(path, what="an outputs record")
    except LineError as e:
        raise FormatError(str(e)) from None
    for at, r in located:
        if "instruction" not in r or "output" not in r:
            raise FormatError(f"{at}: not an outputs record: every record needs `instruction` and `output`")
    return [_from_alpaca(r, path) for _, r in located]
