"""Bad training data loses nothing: every bad line is skipped and reported with file, 1-based line and rule.

The end-to-end test trains `python -m pdjax.train` (a tiny model, a few steps)
on a JSONL file holding a non-JSON line, an empty line, invalid UTF-8, a row
without a completion and an unclosed `<async>`; a missing, an empty and an
all-bad file are one-line errors (exit status 2) before anything compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_toy import question, toy_config, toy_rows, toy_tokenizer

from pdjax.data import build_pipeline
from pdjax.data.sources import DataSourceError

GOOD = toy_rows(24, seed=3)


def bad_file(path: Path) -> tuple[str, dict[int, tuple[str, str]]]:
    """A JSONL file of good rows with bad lines at known places: (path, {1-based line: (rule, detail text)})."""
    lines: list[bytes] = [json.dumps(r).encode() for r in GOOD]
    bad = {
        3: (b'{"prompt": "alpha", "completion": ', "not-json", "not JSON"),
        6: (b"", "empty-line", "empty line"),
        9: (b'{"prompt": "alpha \xff\xfe beta", "completion": "gamma"}', "not-utf8", "not UTF-8"),
        12: (json.dumps({"prompt": question(900)}).encode(), "missing-completion", "no 'completion' field"),
        15: (
            json.dumps({"prompt": question(901), "completion": "<promise>-<topic>alpha 1</topic><async>beta"}).encode(),
            "unclosed-async",
            "unclosed <async>",
        ),
        18: (json.dumps({"prompt": 5, "completion": "alpha"}).encode(), "not-text", "the prompt is an int, not a string"),
        21: (b"[1, 2]", "not-an-object", "not an object"),
    }
    for line in sorted(bad):
        lines.insert(line - 1, bad[line][0])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), {line: (rule, text) for line, (_, rule, text) in bad.items()}


def test_every_bad_line_is_skipped_with_file_line_and_rule(tmp_path):
    source, bad = bad_file(tmp_path / "rows.jsonl")
    skipped_path = tmp_path / "skipped.jsonl"
    it, report = build_pipeline(toy_config(tmp_path, source, skipped_path=str(skipped_path), row_length=256), toy_tokenizer(), log=None)
    assert report.documents == len(GOOD)
    got = {s.line: (s.rule, s.detail) for s in report.skipped}
    assert sorted(got) == sorted(bad)
    for line, (rule, text) in bad.items():
        assert got[line][0] == rule and text in got[line][1], (line, got[line])
    assert all(s.file == source for s in report.skipped)
    written = [json.loads(x) for x in skipped_path.read_text().splitlines()]
    assert sorted(w["line"] for w in written) == sorted(bad) and all(w["file"] == source for w in written)
    summary = report.summary()
    assert f"{source}:3: not JSON" in summary and f"{source}:15: unclosed-async at token" in summary
    assert [s.line for s in report.skipped] == sorted(bad)  # in file order
    assert next(it)["tokens"].shape[1] == 256


def test_json_list_items_and_parquet_rows_are_numbered_from_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = GOOD[:4] + [{"prompt": question(7), "completion": None}]
    (tmp_path / "d.json").write_text(json.dumps(rows[:2] + ["oops"] + rows[2:]))
    _, report = build_pipeline(toy_config(tmp_path, str(tmp_path / "d.json"), row_length=256), toy_tokenizer(), log=None)
    assert [(s.line, s.rule) for s in report.skipped] == [(3, "not-an-object"), (6, "empty-completion")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    _, report = build_pipeline(toy_config(tmp_path, str(tmp_path / "d.parquet"), row_length=256), toy_tokenizer(), log=None)
    assert [(s.file, s.line, s.rule) for s in report.skipped] == [(str(tmp_path / "d.parquet"), 5, "empty-completion")]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such data file or folder"),
        (b"", "the data file is empty"),
        (b"not json\n\n\xff\n", "no usable rows: 3 line(s), none a JSON object (e.g. {path}:1: not JSON"),
        (b'{"prompt": "alpha", "completion": "<async>beta"}\n', "no usable rows in {path} on host 0/1: 1 unclosed-async"),
        (b"[1, 2", "{path}:1: not JSON"),
        (b"PAR1junk", "{path}: cannot read the Parquet data"),
    ],
)
def test_a_source_without_usable_rows_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / ("rows.json" if content == b"[1, 2" else "rows.parquet" if content == b"PAR1junk" else "rows.jsonl")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataSourceError) as err:
        build_pipeline(toy_config(tmp_path, str(path)), toy_tokenizer(), log=None)
    assert message.format(path=path) in str(err.value) and "\n" not in str(err.value)


def train_cli(tmp_path: Path, source: str, *extra: str, timeout: float = 400) -> subprocess.CompletedProcess:
    tok = tmp_path / "tok"
    if not tok.exists():
        toy_tokenizer().save_pretrained(tok)
    overrides = [
        f"data.source={source}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.skipped_path={tmp_path / 'skipped.jsonl'}",
        f"model.tokenizer={tok}",
        "model.vocab_size=128",
        "data.row_length=256",
        "data.batch_size=4",
        "data.num_epochs=null",
        "data.num_threads=0",
        "data.shard_index=0",
        "data.shard_count=1",
        "steps=3",
        "log.every_steps=1",
        "log.progress=false",
        f"log.dir={tmp_path / 'logs'}",
        "mesh.data=1",
        *extra,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pdjax.train", *overrides], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_training_cli_trains_through_bad_lines_and_reports_each(tmp_path):
    source, bad = bad_file(tmp_path / "rows.jsonl")
    run = train_cli(tmp_path, source)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert f"{len(GOOD)} documents kept" in out and f"{len(bad)} skipped" in out
    for rule, _ in bad.values():
        assert rule in out
    assert f"{source}:3: not JSON" in out and f"{source}:15: unclosed-async at token" in out
    assert "unclosed <async>" in out and "control-token-in-span" not in out
    written = {json.loads(x)["line"]: json.loads(x)["rule"] for x in (tmp_path / "skipped.jsonl").read_text().splitlines()}
    assert written == {line: rule for line, (rule, _) in bad.items()}
    metrics = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3  # it trained to the end


def test_training_cli_missing_source_is_one_line_exit_2(tmp_path):
    run = train_cli(tmp_path, str(tmp_path / "nope.jsonl"), timeout=200)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip() == f"pdjax.train: error: {tmp_path / 'nope.jsonl'}: no such data file or folder"
    assert "Traceback" not in run.stderr


def test_a_rerun_reads_neither_the_file_nor_tokenizes_again(tmp_path, monkeypatch):
    import pdjax.data.examples as examples
    import pdjax.data.sources as sources

    source, _ = bad_file(tmp_path / "rows.jsonl")
    cfg = toy_config(tmp_path, source, row_length=256)
    _, first = build_pipeline(cfg, toy_tokenizer(), log=None)

    def boom(*args, **kw):
        raise AssertionError("not cached")

    with monkeypatch.context() as m:
        m.setattr(sources, "read_json_rows", boom)
        m.setattr(examples.Preparer, "__call__", boom)
        _, again = build_pipeline(cfg, toy_tokenizer(), log=None)
    assert again.skipped == first.skipped and again.fingerprint == first.fingerprint
    with open(source, "ab") as f:  # a changed file is read again
        f.write(b"not json\n")
    _, changed = build_pipeline(cfg, toy_tokenizer(), log=None)
    assert len(changed.skipped) == len(first.skipped) + 1 and changed.skipped[-1].rule == "not-json"


def test_hosts_split_the_rows_and_host_0_alone_reports_unreadable_lines(tmp_path):
    source, bad = bad_file(tmp_path / "rows.jsonl")
    reports = [
        build_pipeline(toy_config(tmp_path, source, row_length=256, batch_size=2, shard_index=h, shard_count=2),
                       toy_tokenizer(), log=None)[1]
        for h in range(2)
    ]  # fmt: skip
    lines = [s.line for r in reports for s in r.skipped]
    assert sorted(lines) == sorted(bad)  # each bad line reported once over the hosts
    assert {s.rule for s in reports[1].skipped} <= {"missing-completion", "unclosed-async", "not-text"}
    assert sum(r.documents for r in reports) == len(GOOD)
