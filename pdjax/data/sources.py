"""Reading rows: Hugging Face datasets or local JSON / JSONL / Parquet, and the turns of one row.

A row gives one (prompt, completion) pair, either from ``prompt`` /
``completion`` columns (the released reference's format) or from chat
``messages``: the last assistant turn is the completion and the user turn
before it the prompt. A row that cannot give a pair raises `RowError`, which
the pipeline reports and skips. Local JSON / JSONL files are read line by line
(`read_local_json`), so a line that is not UTF-8, empty, not JSON or not an
object is skipped and reported with its file and 1-based line instead of
stopping the run.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Mapping

import numpy as np

from pdjax.cli_errors import UserError
from pdjax.data.config import DataConfig
from pdjax.data.report import SkippedRow
from pdjax.data.synthetic_source import ensure_synthetic, is_synthetic
from pdjax.jsonl import LineError, article, json_array_items, read_jsonl

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
        try:
            ensure_synthetic(config.source, log=log)
        except ValueError as e:  # a bad key or count, a folder built with other settings: the user's to fix
            raise DataSourceError(str(e) if config.source in str(e) else f"data.source {config.source}: {e}") from None


class DataSourceError(UserError, ValueError):
    """A training source that cannot be read at all (missing, empty, no usable rows, unknown columns)."""


# Columns of a source read by `read_json_rows`: the pair (named as the config's columns) and its row's error.
RULE_COLUMN = "_pdjax_rule"
DETAIL_COLUMN = "_pdjax_detail"


@dataclasses.dataclass
class Source:
    """The rows of a source and where each came from.

    ``dataset`` holds the rows (`datasets.Dataset`), ``fmt`` their format for
    `row_turns`. ``origins[i]`` is (file index, 1-based line) of row i: its line
    in a JSONL file, its item in a .json list, its row in a Parquet file (None
    for Hub datasets). ``unreadable`` are the lines that gave no row at all
    (not UTF-8, empty, not JSON, not an object), each with file and line.
    """

    dataset: Any
    fmt: str
    files: list[str]
    origins: np.ndarray | None
    unreadable: list[SkippedRow]

    def where(self, row: int) -> tuple[str | None, int | None]:
        """(file, 1-based line) of dataset row `row`, or (None, None) when unknown."""
        if self.origins is None or not 0 <= row < len(self.origins):
            return None, None
        file_index, line = self.origins[row]
        return self.files[int(file_index)], int(line)

    def skipped_row(self, row: int, rule: str, position: int, detail: str) -> SkippedRow:
        """A `SkippedRow` of dataset row `row`, with its file and line."""
        file, line = self.where(row)
        return SkippedRow(int(row), str(rule), int(position), str(detail), file, line)

    def with_unreadable(self, skipped: list[SkippedRow], report_unreadable: bool = True) -> list[SkippedRow]:
        """`skipped` and (when `report_unreadable`) the unreadable lines, in file and line order."""
        if not report_unreadable or not self.unreadable:
            return skipped
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self.unreadable + skipped, key=lambda s: (order.get(s.file, -1), s.line or 0, s.row))


def _looks_local(source: str) -> bool:
    """Whether `source` is meant as a path (not a Hub name): a separator-led path or a data file extension."""
    first = source.split(",")[0].strip()
    return first.startswith(("/", ".", "~")) or os.path.splitext(first)[1].lower() in LOCAL_BUILDERS


def _folder_files(folder: str, split: str) -> list[str] | None:
    """The data files of `split` in a local dataset folder (Hugging Face's file-name rules), if all are JSON."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(folder), base_path=folder).get(split)
    except (FileNotFoundError, ValueError):
        return None
    files = sorted(str(f) for f in files or [])
    if files and all(LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) == "json" for f in files):
        return files
    return None


JSON_CACHE_VERSION = "1"  # bump when `read_json_rows` changes what it keeps


def _json_cache_dir(files: list[str], config: DataConfig) -> str:
    """The cache folder of these files as read with this config's columns (keyed by paths, sizes and mtimes)."""
    import hashlib

    import datasets

    h = hashlib.sha256(JSON_CACHE_VERSION.encode())
    for f in files:
        st = os.stat(f)
        h.update(repr((os.path.abspath(f), st.st_size, st.st_mtime_ns)).encode())
    h.update(repr((config.format, config.prompt_column, config.completion_column, config.messages_column)).encode())
    root = config.cache_dir or datasets.config.HF_DATASETS_CACHE
    return os.path.join(os.path.expanduser(str(root)), "pdjax_json", h.hexdigest()[:20])


def read_local_json(files: list[str], config: DataConfig) -> Source:
    """`read_json_rows`, cached: the rows are kept as Arrow files so a rerun neither re-reads nor re-tokenizes."""
    import json

    import datasets

    cache = _json_cache_dir(files, config)
    done = os.path.join(cache, "source.json")
    if os.path.exists(done):
        try:
            with open(done, encoding="utf-8") as f:
                meta = json.load(f)
            dataset = datasets.load_from_disk(os.path.join(cache, "rows"))
            origins = np.asarray(meta["origins"], np.int64).reshape(-1, 2)
            unreadable = [SkippedRow(**u) for u in meta["unreadable"]]
            return Source(dataset, "prompt_completion", files, origins, unreadable)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache: read the files again
    import shutil

    source = read_json_rows(files, config)
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
        source.dataset.save_to_disk(os.path.join(tmp, "rows"))
        meta = {"origins": source.origins.tolist(), "unreadable": [dataclasses.asdict(u) for u in source.unreadable]}
        with open(os.path.join(tmp, "source.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if os.path.exists(cache):
            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        source.dataset = datasets.load_from_disk(os.path.join(cache, "rows"))  # file-backed: `map` caches
    except OSError:  # a read-only cache, or another host wrote it first: train from memory
        shutil.rmtree(tmp, ignore_errors=True)
    return source


def read_json_rows(files: list[str], config: DataConfig) -> Source:
    """Rows of local JSON / JSONL files, read line by line: every bad line or row is kept for the report.

    Each JSON object becomes one row with its (prompt, completion) pair under the
    config's column names, or the `RowError` that the pair breaks; lines that are
    no object are `unreadable`. Raises `DataSourceError` for an empty file or a
    source without a single JSON object.
    """
    import datasets

    objects: list[dict] = []
    origins: list[tuple[int, int]] = []
    unreadable: list[SkippedRow] = []
    for file_index, path in enumerate(files):
        try:
            items = json_array_items(path) if path.lower().endswith(".json") else None
        except LineError as err:
            if err.rule == "empty-file":
                raise DataSourceError(f"{path}: the data file is empty") from None
            raise DataSourceError(str(err)) from None
        numbered: list[tuple[int, Any]] = list(enumerate(items, 1)) if items is not None else list(read_jsonl(path))
        if not numbered:
            raise DataSourceError(f"{path}: the data file is empty")
        for line, value in numbered:
            if isinstance(value, LineError):
                unreadable.append(SkippedRow(-1, value.rule, -1, value.detail, path, line))
            elif not isinstance(value, dict):
                unreadable.append(
                    SkippedRow(-1, "not-an-object", -1, f"{article(value)} in JSON, not an object", path, line)
                )
            else:
                objects.append(value)
                origins.append((file_index, line))
    if not objects:
        example = f" (e.g. {unreadable[0].file}:{unreadable[0].line}: {unreadable[0].detail})" if unreadable else ""
        raise DataSourceError(
            f"{config.source}: no usable rows: {len(unreadable)} line(s), none a JSON object{example}"
        )
    columns = list(dict.fromkeys(k for obj in objects for k in obj))
    fmt = resolve_format(columns, config)
    prompts: list[str | None] = []
    completions: list[str | None] = []
    rules: list[str] = []
    details: list[str] = []
    for obj in objects:
        try:
            prompt, completion = row_turns(obj, fmt, config)
            rule = detail = ""
        except RowError as err:
            prompt = completion = None
            rule, detail = err.rule, err.detail
        prompts.append(prompt)
        completions.append(completion)
        rules.append(rule)
        details.append(detail)
    dataset = datasets.Dataset.from_dict(
        {
            config.prompt_column: prompts,
            config.completion_column: completions,
            RULE_COLUMN: rules,
            DETAIL_COLUMN: details,
        },
        features=datasets.Features(
            {
                config.prompt_column: datasets.Value("string"),
                config.completion_column: datasets.Value("string"),
                RULE_COLUMN: datasets.Value("string"),
                DETAIL_COLUMN: datasets.Value("string"),
            }
        ),
    )
    return Source(dataset, "prompt_completion", files, np.asarray(origins, np.int64).reshape(-1, 2), unreadable)


def _parquet_origins(files: list[str]) -> np.ndarray:
    """(file index, 1-based row in the file) of each row of Parquet files read in order."""
    import pyarrow.parquet as pq

    parts = [
        np.stack([np.full(n, i), np.arange(1, n + 1)], axis=1)
        for i, n in enumerate(pq.ParquetFile(f).metadata.num_rows for f in files)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 2), np.int64)


def open_source(config: DataConfig) -> Source:
    """The source's rows with their origins; raises `DataSourceError` when it is missing, empty or unreadable."""
    import datasets

    if is_synthetic(config.source):
        return read_local_json([ensure_synthetic(config.source, log=None).file(config.split)], config)
    files = local_files(config.source)
    if files is None and os.path.isdir(os.path.expanduser(config.source)):
        files = _folder_files(os.path.expanduser(config.source), config.split)
    if files is not None:
        kinds = {LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataSourceError(f"local data files must all be .json/.jsonl or all .parquet, got {files}")
        if kinds == {"json"}:
            return read_local_json(files, config)
        for f in files:
            if os.path.getsize(f) == 0:
                raise DataSourceError(f"{f}: the data file is empty")
        try:
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=config.cache_dir)
        except Exception as e:  # a corrupt Parquet file: pyarrow's error names the problem, not the file
            raise DataSourceError(f"{config.source}: cannot read the Parquet data ({type(e).__name__}: {e})") from None
        origins = _parquet_origins(files)
    else:
        if _looks_local(config.source):
            parts = [p.strip() for p in config.source.split(",") if p.strip()]
            missing = next((p for p in parts if not glob.glob(os.path.expanduser(p))), config.source)
            raise DataSourceError(f"{missing}: no such data file or folder")
        try:
            dataset = datasets.load_dataset(config.source, split=config.split, cache_dir=config.cache_dir)
        except (FileNotFoundError, ValueError, ConnectionError) as e:
            message = " ".join(str(e).split())
            raise DataSourceError(f"cannot load the dataset {config.source!r} (split {config.split!r}): {message}") from None
        files, origins = [], None
    if len(dataset) == 0:
        raise DataSourceError(f"{config.source}: the dataset has no rows")
    return Source(dataset, resolve_format(list(dataset.column_names), config), files, origins, [])


def load_source(config: DataConfig) -> Any:
    """The whole split as a `datasets.Dataset` (hub name, local folder, local data files, or ``synthetic:``)."""
    return open_source(config).dataset


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
    raise DataSourceError(
        f"{config.source}: the dataset has columns {columns}, but format {config.format!r} needs {wanted}; "
        "name yours with DataConfig.prompt_column / completion_column / messages_column"
    )


def host_range(num_rows: int, shard_index: int, shard_count: int) -> range:
    """The contiguous block of source rows host `shard_index` of `shard_count` reads."""
    per, extra = divmod(num_rows, shard_count)
    start = shard_index * per + min(shard_index, extra)
    return range(start, start + per + (shard_index < extra))


def _field(row: Mapping[str, Any], column: str, what: str) -> Any:
    if column not in row:
        raise RowError(f"missing-{what}", f"the row has no {column!r} field")
    return row[column]


def _text(value: Any, what: str) -> str:
    if value is None:
        raise RowError(f"empty-{what}", f"the {what} is missing")
    if not isinstance(value, str):
        raise RowError("not-text", f"the {what} is {article(value)}, not a string")
    if not value.strip():
        raise RowError(f"empty-{what}", f"the {what} is empty")
    return value


def row_turns(row: Mapping[str, Any], fmt: str, config: DataConfig) -> tuple[str, str]:
    """(prompt, completion) of one row; raises `RowError` when the row gives none."""
    if row.get(RULE_COLUMN):  # a row `read_json_rows` already found unusable
        raise RowError(row[RULE_COLUMN], row.get(DETAIL_COLUMN) or "")
    if fmt == "prompt_completion":
        prompt = _text(_field(row, config.prompt_column, "prompt"), "prompt")
        return prompt, _text(_field(row, config.completion_column, "completion"), "completion")
    messages = _field(row, config.messages_column, "messages")
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
