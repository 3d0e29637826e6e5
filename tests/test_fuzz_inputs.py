"""Property tests: arbitrary bytes, token sequences and arguments give a typed error or a skip, never a crash.

Covered: the JSONL / JSON readers (`pdjax.jsonl`, the training source reader,
the annotators' input, eval prompts and outputs), the plan parser and what is
built on it (segments, clean text, plan view), the Retry-After parser and the
argument checks of `pdjax.train` overrides and `pdjax.memory`. Nothing here
compiles a model; examples are few so that the file runs in seconds.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pdjax.annotate.client import retry_after_seconds
from pdjax.annotate.rows import read_rows
from pdjax.cli_errors import UserError, run_main
from pdjax.data.config import DataConfig
from pdjax.data.sources import DataSourceError, open_source
from pdjax.eval.prompts import PromptError, load_prompts
from pdjax.eval.store import FormatError, read_outputs
from pdjax.jsonl import LineError, read_jsonl, read_records
from pdjax.structure import PlanError, clean_tokens, parse_response, plan_view, segments_from_tokens, strip_plan
from structures import IDS

CACHE = tempfile.TemporaryDirectory(prefix="pdjax-fuzz-cache-")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

GOOD_LINE = json.dumps({"prompt": "alpha", "completion": "beta"}).encode()
# lines that look like the real thing, broken in the ways files break
LINES = st.one_of(
    st.binary(max_size=40),
    st.just(GOOD_LINE),
    st.just(b""),
    st.just(b'{"prompt": "a"'),
    st.just(GOOD_LINE[: len(GOOD_LINE) // 2]),
    st.just(b"\xef\xbb\xbf" + GOOD_LINE),
    st.just(b"[" * 5000),
    st.just(b'{"prompt": 5, "completion": null}'),
    st.just(b'{"messages": [{"role": "user"}]}'),
    st.builds(lambda v: json.dumps(v).encode(), st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                                             lambda c: st.lists(c, max_size=3)
                                                             | st.dictionaries(st.text(max_size=5), c, max_size=3),
                                                             max_leaves=6)),
)  # fmt: skip
FILES = st.one_of(st.binary(max_size=300), st.lists(LINES, max_size=8).map(lambda ls: b"\n".join(ls)))


def _write(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@FAST
@given(FILES)
def test_read_jsonl_gives_every_line_a_value_or_a_line_error(data):
    path = _write(data, ".jsonl")
    try:
        got = list(read_jsonl(path))
    finally:
        os.unlink(path)
    expected_lines = len(data.split(b"\n")) - (1 if data.endswith(b"\n") or not data else 0)
    assert [n for n, _ in got] == list(range(1, expected_lines + 1))
    for n, value in got:
        if isinstance(value, LineError):
            assert value.line == n and value.rule in {"not-utf8", "empty-line", "not-json"}
            assert f"{path}:{n}: " in str(value)


@FAST
@given(FILES, st.sampled_from([".json", ".jsonl", ".txt"]), st.booleans())
def test_read_records_returns_records_or_raises_a_line_error(data, suffix, objects):
    path = _write(data, suffix)
    try:
        records = read_records(path, objects=objects)
    except LineError as e:
        assert str(e).startswith(path) and e.line >= 1
        return
    finally:
        os.unlink(path)
    assert all(where.startswith(path) for where, _ in records)
    assert not objects or all(isinstance(r, dict) for _, r in records)


@FAST
@given(FILES, st.sampled_from([".json", ".jsonl"]))
def test_training_source_reader_skips_or_refuses(data, suffix):
    path = _write(data, suffix)
    try:
        source = open_source(DataConfig(source=path, shard_index=0, shard_count=1, cache_dir=CACHE.name))
    except DataSourceError as e:
        assert "\n" not in str(e)
        return
    finally:
        os.unlink(path)
    lines = {s.line for s in source.unreadable}
    rows = {int(line) for _, line in source.origins}
    assert not lines & rows and len(source.dataset) == len(source.origins) >= 1
    if suffix == ".jsonl":  # every line is a row or reported, none lost
        n_lines = len(data.split(b"\n")) - (1 if data.endswith(b"\n") else 0)
        assert lines | rows == set(range(1, n_lines + 1))


@FAST
@given(FILES)
def test_annotate_input_rows_or_a_line_error(data):
    path = _write(data, ".jsonl")
    try:
        rows = list(read_rows(path))
        assert all(isinstance(r.prompt, str) and isinstance(r.response, str) for r in rows)
    except LineError as e:
        assert isinstance(e, UserError) and e.line >= 1
    finally:
        os.unlink(path)


@FAST
@given(FILES, st.sampled_from([".json", ".jsonl"]))
def test_eval_prompts_and_outputs_or_a_typed_error(data, suffix):
    path = _write(data, suffix)
    try:
        try:
            prompts = load_prompts(path)
            assert prompts and all(isinstance(p.instruction, str) for p in prompts)
        except PromptError as e:
            assert "\n" not in str(e)
        try:
            read_outputs(path)
        except FormatError as e:
            assert "\n" not in str(e)
    finally:
        os.unlink(path)


TOKENS = st.lists(st.sampled_from([50, 51, 52, 53, 54, 55, 56, 57, 60, 61, 65, 100, 101]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(TOKENS, st.integers(0, 5), st.booleans(), st.booleans())
def test_plan_parser_and_its_users_never_crash(tokens, start, allow_truncated, allow_masks):
    start = min(start, len(tokens))
    try:
        parsed = parse_response(tokens, IDS, start, allow_truncated=allow_truncated, allow_masks=allow_masks)
    except PlanError as e:
        assert start <= e.position <= len(tokens) and e.rule in str(e)
    else:
        assert parsed.start == start and parsed.end <= len(tokens)
    for mode in ("planned", "dense", "ar_only", "diffusion_only"):
        if not 1 <= start <= len(tokens):  # the prompt is at least one token (a precondition, not data)
            break
        try:
            seg = segments_from_tokens(tokens, start, IDS, mode=mode)
            assert all(len(np.asarray(x)) == len(tokens) for x in seg)
        except PlanError:
            pass
    for view in (clean_tokens, plan_view, strip_plan):
        try:
            view(tokens, IDS, start)
        except PlanError:
            pass


@FAST
@given(st.one_of(st.none(), st.text(max_size=40), st.from_regex(r"\s*-?[0-9.e]{1,8}\s*", fullmatch=True)))
def test_retry_after_is_seconds_or_none(value):
    got = retry_after_seconds(value, now=0.0)
    assert got is None or got >= 0.0


KEYS = st.sampled_from(["steps", "data.row_length", "data.mode", "optimizer.learning_rate", "mesh.fsdp", "lora.rank",
                        "log.every_steps", "data.source", "nope", "data", "model.vocab_size", ""])  # fmt: skip
VALUES = st.one_of(st.text(max_size=8), st.integers(-5, 10**6).map(str), st.sampled_from(["null", "[1,", "{a: b}", "1e-3"]))


@FAST
@given(st.lists(st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=10), max_size=4))
@example(["data="])  # an empty section once raised TypeError
def test_train_overrides_give_a_config_or_one_line_error(items):
    from pdjax.train.cli import main

    code = run_main(main, ["--print-config", *items], prog="pdjax.train")
    assert code in (0, 2)


@FAST
@example("tiny", [("--fsdp", "0")])  # once a ZeroDivisionError
@given(
    st.sampled_from(["tiny", "dream_7b", "nope", "/no/such/folder", ""]),
    st.lists(st.tuples(st.sampled_from(["--fsdp", "--tensor", "--seq_len", "--batch_per_device", "--lora_rank",
                                        "--serve_batch", "--max_length", "--param_bytes"]),
                       st.sampled_from(["0", "-1", "1", "3", "1e9", "nan", "x"])), max_size=3),
)  # fmt: skip
def test_memory_arguments_give_a_table_or_one_line_error(model, flags):
    from pdjax.memory import main

    argv = ["--model", model] + [x for pair in flags for x in pair]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a value of the wrong type
        code = e.code
    assert code in (0, 2)
