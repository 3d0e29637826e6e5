"""Sources (JSONL, JSON, Parquet, a dataset folder, chat messages), the chat layout, and the skipped-row report."""

import json

import numpy as np
import pytest
from test_data_toy import (
    documents,
    encode,
    prompt_ids,
    question,
    row_of,
    toy_config,
    toy_ids,
    toy_rows,
    toy_tokenizer,
    write_jsonl,
)

from pdjax.data import build_pipeline
from pdjax.structure import Role


def epoch_documents(it) -> dict[int, np.ndarray]:
    """Row number -> document tokens, over one pass of the iterator."""
    docs = {}
    for batch in it:
        for b, _, where in documents(batch):
            tokens = batch["tokens"][b, where]
            docs[row_of(tokens)] = tokens
    return docs


@pytest.fixture(scope="module")
def rows():
    return toy_rows(12, seed=1)


def expected_document(prompt: str, completion: str) -> np.ndarray:
    return np.asarray(prompt_ids(prompt) + encode(completion) + [toy_ids().eos], np.int32)


def test_jsonl_json_parquet_and_folder_give_the_same_documents(tmp_path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    got = []
    for source in (jsonl, str(tmp_path / "d.json"), str(tmp_path / "d.parquet"), str(folder)):
        it, report = build_pipeline(toy_config(tmp_path, source, pad_max=0), toy_tokenizer(), log=None)
        assert report.rows_read == 12 and report.documents == 12 and not report.skipped
        got.append(epoch_documents(it))
    for docs in got:
        assert sorted(docs) == list(range(12))
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(docs[i], expected_document(row["prompt"], row["completion"]))


def test_messages_use_the_last_assistant_turn_and_the_user_turn_before_it(tmp_path):
    conversations = [
        {"messages": [{"role": "user", "content": question(0)}, {"role": "assistant", "content": "alpha beta"}]},
        {
            "messages": [
                {"role": "system", "content": "gamma"},
                {"role": "user", "content": "delta"},
                {"role": "assistant", "content": "epsilon"},
                {"role": "user", "content": question(1)},
                {"role": "assistant", "content": "<promise>-<topic>zeta 1</topic><async>eta theta</async>"},
                {"role": "user", "content": "iota"},
            ]
        },
        {"messages": [{"role": "assistant", "content": "kappa"}]},
        {"messages": [{"role": "user", "content": "lambda"}]},
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", conversations)
    it, report = build_pipeline(toy_config(tmp_path, source, pad_max=0), toy_tokenizer(), log=None)
    assert report.skipped_by_rule == {"no-user-turn": 1, "no-assistant-turn": 1}
    assert [s.row for s in report.skipped] == [2, 3]
    docs = epoch_documents(it)
    np.testing.assert_array_equal(docs[0], expected_document(question(0), "alpha beta"))
    np.testing.assert_array_equal(
        docs[1], expected_document(question(1), "<promise>-<topic>zeta 1</topic><async>eta theta</async>")
    )


def test_missing_columns_are_a_clear_error(tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\].*'prompt' and 'completion'.*'messages'"):
        build_pipeline(toy_config(tmp_path, source), toy_tokenizer(), log=None)
    with pytest.raises(ValueError, match="needs a column 'messages'"):
        build_pipeline(toy_config(tmp_path, source, format="messages"), toy_tokenizer(), log=None)
    it, report = build_pipeline(
        toy_config(tmp_path, source, prompt_column="question", completion_column="answer"), toy_tokenizer(), log=None
    )
    assert report.documents == 1


MALFORMED = [
    # (completion, rule, position of the violation within the completion's tokens, or None)
    ("<async>alpha<async>beta</async></async>", "nested-async", 2),
    ("<promise>-<topic>alpha 1</topic><async>beta", "unclosed-async", 4),  # <|im_end|> comes before any </async>
    ("alpha</async>", "stray-async-end", 1),
    ("<promise>-<topic>alpha</topic><async>beta</async>", "missing-promise-length", 0),
    ("<promise>-<topic>alpha 123</topic><async>beta</async>", "promise-length-too-long", 2),
    ("<promise>-<topic>alpha 1</topic><promise>-<topic>beta 2</topic><async>gamma</async>", "span-count-mismatch", 8),
    ("<promise>-<topic>alpha 1</topic><async>beta</async>gamma", "text-after-group", 7),
    ("alpha [PAD] beta", "pad-outside-span", 1),
    ("alpha <sync/> beta", "sync-without-promise", 1),
]


def test_malformed_rows_are_skipped_counted_and_written_with_reasons(tmp_path, capsys):
    rows = toy_rows(5, seed=2)
    rows += [{"prompt": question(100 + i), "completion": c} for i, (c, _, _) in enumerate(MALFORMED)]
    rows += [
        {"prompt": "", "completion": "alpha"},
        {"prompt": question(200), "completion": None},
        {"prompt": question(201), "completion": " ".join(["alpha"] * 200)},
        {"prompt": question(202), "completion": "alpha"},
    ]
    source = write_jsonl(tmp_path / "mixed.jsonl", rows)
    path = tmp_path / "out" / "skipped.jsonl"
    it, report = build_pipeline(toy_config(tmp_path, source, row_length=192, skipped_path=str(path)), toy_tokenizer(), log=print)

    expected = {rule: 1 for _, rule, _ in MALFORMED} | {"empty-prompt": 1, "empty-completion": 1, "too-long": 1}
    assert report.skipped_by_rule == expected
    assert report.rows_read == len(rows) and report.documents == 6
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(5, 5 + len(MALFORMED))) + [14, 15, 16]
    for line, (completion, rule, offset) in zip(lines, MALFORMED):
        prompt_len = len(prompt_ids(question(line["row"] - 5 + 100)))
        assert line["rule"] == rule and line["position"] == prompt_len + offset, line
        assert rule in line["detail"]
    assert lines[-1]["rule"] == "too-long" and lines[-1]["position"] == 192
    assert lines[-3]["position"] == -1 and "empty" in lines[-3]["detail"]

    printed = capsys.readouterr().out
    assert "12 skipped" in printed and str(path) in printed
    for rule in expected:
        assert rule in printed
    assert len(epoch_documents(it)) == 6  # training goes on with the good rows


def test_padding_token_and_roles_of_a_packed_row(tmp_path, rows):
    source = write_jsonl(tmp_path / "d.jsonl", rows[:1])
    it, report = build_pipeline(toy_config(tmp_path, source, pad_max=0, batch_size=1), toy_tokenizer(), log=None)
    batch = next(it)
    n = len(expected_document(rows[0]["prompt"], rows[0]["completion"]))
    assert np.all(batch["role"][0, n:] == Role.PADDING) and np.all(batch["doc_id"][0, n:] == 0)
    assert np.all(batch["tokens"][0, n:] == toy_ids().eos)  # the toy tokenizer has no pad token
    assert report.packing_efficiency == pytest.approx(n / 96)


def test_no_usable_rows_is_an_error_that_shows_the_reasons(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "alpha", "completion": "<async>beta"}] * 3)
    with pytest.raises(ValueError, match="no usable rows.*3 unclosed-async"):
        build_pipeline(toy_config(tmp_path, source, skipped_path=str(tmp_path / "s.jsonl")), toy_tokenizer())
    assert "unclosed-async" in capsys.readouterr().out
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3
