"""First-fit packing, packed segments vs the unpacked documents, epochs, exact resume, per-host shards."""

import dataclasses
import json

import numpy as np
import pytest
from test_data_toy import (
    documents,
    prompt_ids,
    question,
    row_of,
    toy_config,
    toy_ids,
    toy_rows,
    toy_tokenizer,
    write_jsonl,
)

from pdjax.data import BATCH_KEYS, build_pipeline, first_fit
from pdjax.structure import Role, Segments, segments_from_tokens

ROWS = 40


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packing")
    return tmp, write_jsonl(tmp / "d.jsonl", toy_rows(ROWS, seed=5))


def test_first_fit_by_hand():
    # 7 opens row 0; 5 opens row 1; 3 fits row 0; 4 fits row 1; 2 fits neither (0 has 0 left, 1 has 1 left).
    assert first_fit([7, 5, 3, 4, 2], 10, window=8) == [[0, 2], [1, 3], [4]]
    # With a window of 1, opening a row closes the previous one.
    assert first_fit([7, 5, 3, 4, 2], 10, window=1) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ValueError, match="more than the row length"):
        first_fit([11], 10, window=4)


def relabel(block: np.ndarray) -> np.ndarray:
    """Block ids renumbered 1, 2, ... in order of first appearance (0 stays 0)."""
    order = {b: k + 1 for k, b in enumerate(dict.fromkeys(int(x) for x in block if x))}
    return np.array([order.get(int(x), 0) for x in block])


@pytest.mark.parametrize("mode", ["planned", "dense", "ar_only", "diffusion_only"])
def test_every_document_once_per_epoch_with_the_segments_of_the_unpacked_document(source, mode):
    tmp, path = source
    cfg = toy_config(tmp, path, num_epochs=2, row_length=160, batch_size=4, mode=mode)
    it, report = build_pipeline(cfg, toy_tokenizer(), log=None)
    batches = list(it)
    assert len(batches) == report.total_batches
    ids = toy_ids()
    seen: list[list[int]] = [[] for _ in range(4)]  # each lane (row of the batch) reads its quarter of the source
    real = 0
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS)
        assert all(v.shape == (4, 160) and v.dtype == np.int32 for v in batch.values())
        for b in range(4):
            doc_ids = [d for _, d, _ in documents({"doc_id": batch["doc_id"][b : b + 1]})]
            assert doc_ids == list(range(1, len(doc_ids) + 1))
            blocks = [set(batch["block_id"][b][batch["doc_id"][b] == d]) - {0} for d in doc_ids]
            assert all(not (x & y) for k, x in enumerate(blocks) for y in blocks[k + 1 :])  # row-unique blocks
        for b, _, where in documents(batch):
            toks = batch["tokens"][b, where]
            row = row_of(toks)
            seen[b].append(row)
            real += len(toks)
            p = len(prompt_ids(question(row)))
            unpacked = segments_from_tokens(toks, p, ids, mode=mode)
            packed = Segments(*(batch[f][b, where] for f in Segments._fields))
            np.testing.assert_array_equal(relabel(packed.block_id), relabel(unpacked.block_id))
            for field in ("visible_from", "position", "role"):
                np.testing.assert_array_equal(getattr(packed, field), getattr(unpacked, field))
        pad = batch["doc_id"] == 0
        assert np.all(batch["role"][pad] == Role.PADDING)
    quarter = ROWS // 4
    for lane, rows in enumerate(seen):
        first, second = rows[:quarter], rows[quarter:]
        mine = list(range(lane * quarter, (lane + 1) * quarter))
        assert sorted(first) == mine and sorted(second) == mine
        assert first != second  # reshuffled
    slots = len(batches) * 4 * 160
    assert report.packing_efficiency == pytest.approx(real / slots)
    assert report.filler_rows == len(batches) * 4 - sum(report.rows_per_epoch)


def test_resume_mid_epoch_gives_the_identical_remaining_batches(source):
    tmp, path = source
    cfg = toy_config(tmp, path, num_epochs=3, row_length=160, batch_size=2, num_threads=2, prefetch=3)
    _, report = build_pipeline(cfg, toy_tokenizer(), log=None)
    first, second = report.rows_per_epoch[:2]
    for stop in (first // 4, (first + second // 2) // 2):  # inside epoch 0, inside epoch 1
        it, _ = build_pipeline(cfg, toy_tokenizer(), log=None)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        rest = list(it)
        assert len(rest) == report.total_batches - stop

        fresh, _ = build_pipeline(cfg, toy_tokenizer(), log=None)
        fresh.set_state(state)
        again = list(fresh)
        assert len(again) == len(rest)
        for x, y in zip(rest, again):
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(x[key], y[key])


def test_hosts_read_disjoint_shards(source):
    tmp, path = source
    seen = []
    for host in range(2):
        cfg = toy_config(tmp, path, row_length=160, batch_size=4, shard_index=host, shard_count=2)
        it, report = build_pipeline(cfg, toy_tokenizer(), log=None)
        assert report.rows_read == ROWS // 2 and report.batch_size == 2
        rows = [row_of(batch["tokens"][b, where]) for batch in it for b, _, where in documents(batch)]
        assert len(rows) == len(set(rows)) == ROWS // 2
        seen.append(set(rows))
    assert seen[0] == set(range(ROWS // 2)) and seen[1] == set(range(ROWS // 2, ROWS))


def test_default_shard_comes_from_jax(source):
    tmp, path = source
    cfg = toy_config(tmp, path, row_length=160, shard_index=None, shard_count=None)
    _, report = build_pipeline(cfg, toy_tokenizer(), log=None)
    assert (report.host, report.num_hosts) == (0, 1) and report.rows_read == ROWS


def test_forever_repeats_epochs_with_fresh_order(source):
    tmp, path = source
    cfg = toy_config(tmp, path, row_length=160, batch_size=1, num_epochs=None)
    it, report = build_pipeline(cfg, toy_tokenizer(), log=None)
    assert report.total_batches is None
    docs = []
    while len(docs) < 3 * ROWS + 5:  # three epochs and a bit: the stream goes on
        batch = next(it)
        docs += [row_of(batch["tokens"][b, where]) for b, _, where in documents(batch)]
    epochs = [docs[e * ROWS : (e + 1) * ROWS] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(ROWS))
    assert epochs[0] != epochs[1] != epochs[2]


def test_hosts_agree_on_the_batch_count_and_pad_with_filler_rows(source, monkeypatch):
    """Two hosts simulated: the other host packs 3 more batches, so this one adds all-padding rows."""
    import jax
    from jax.experimental import multihost_utils

    tmp, path = source
    cfg = toy_config(
        tmp, path, row_length=160, batch_size=4, shard_index=None, shard_count=None,
        skipped_path=str(tmp / "skipped.jsonl"),
    )
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([np.asarray(x) + 3, np.asarray(x)]))
    _, alone = build_pipeline(dataclasses.replace(cfg, shard_index=1, shard_count=2), toy_tokenizer(), log=None)
    own = alone.total_batches  # its longest lane's rows, without agreement
    it, report = build_pipeline(cfg, toy_tokenizer(), log=None)
    assert (tmp / "skipped.host1.jsonl").exists()
    assert report.total_batches == own + 3 and report.filler_rows == 2 * own + 6 - report.rows_per_epoch[0]
    batches = list(it)
    assert len(batches) == own + 3
    for batch in batches[own:]:
        assert np.all(batch["role"] == Role.PADDING) and np.all(batch["doc_id"] == 0)
    rows = [row_of(batch["tokens"][b, where]) for batch in batches for b, _, where in documents(batch)]
    assert sorted(rows) == list(range(ROWS // 2, ROWS))
