"""Ablations (topic, sync), the AR-only / diffusion-only layouts with eos fill, and the per-epoch [PAD] draw."""

from collections import Counter

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

from pdjax.data import DataConfig, ablate_topic, build_pipeline
from pdjax.structure import NEVER, Role, Segments, attention_mask


def one_epoch(it) -> dict[int, dict[str, np.ndarray]]:
    """Row number -> that document's slice of every batch field."""
    docs = {}
    for batch in it:
        for b, _, where in documents(batch):
            doc = {k: v[b, where] for k, v in batch.items()}
            docs[row_of(doc["tokens"])] = doc
    return docs


def test_ablate_topic_keeps_the_length_number():
    text = (
        "so <promise>-<topic>history of the term 2</topic><promise>-<topic>why 12</topic>"
        "<async>a</async><async>b</async><sync/><promise>-<topic>last\n3</topic><async>c</async>"
    )
    assert ablate_topic(text) == (
        "so <promise>-<topic>topic 2</topic><promise>-<topic>topic 12</topic>"
        "<async>a</async><async>b</async><sync/><promise>-<topic>topic 3</topic><async>c</async>"
    )
    # The first run of digits is the promised length; a promise without one stays (and fails validation).
    assert ablate_topic("<promise>-<topic>2 steps 5</topic>") == "<promise>-<topic>topic 2</topic>"
    kept = "<promise>-<topic>no number</topic><promise>-<topic>next 4</topic>"
    assert ablate_topic(kept) == "<promise>-<topic>no number</topic><promise>-<topic>topic 4</topic>"
    assert ablate_topic("plain text 12 without promises") == "plain text 12 without promises"


def test_ablate_topic_in_the_pipeline(tmp_path):
    rows = [{"prompt": question(0), "completion": "alpha <promise>-<topic>beta gamma 2</topic><async>delta</async>"}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    it, _ = build_pipeline(toy_config(tmp_path, source, pad_max=0, ablate_topic=True), toy_tokenizer(), log=None)
    doc = one_epoch(it)[0]
    expected = prompt_ids(question(0)) + encode("alpha <promise>-<topic>topic 2</topic><async>delta</async>")
    np.testing.assert_array_equal(doc["tokens"], expected + [toy_ids().eos])


def test_ablate_sync_keeps_multi_round_rows_and_never_releases_their_groups(tmp_path):
    completion = (
        "<promise>-<topic>alpha 1</topic><promise>-<topic>beta 2</topic><async>gamma</async><async>delta eta</async>"
        "<sync/>theta <promise>-<topic>iota 1</topic><async>kappa</async><sync/>lambda mu"
    )
    rows = [{"prompt": question(0), "completion": completion}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    it, report = build_pipeline(toy_config(tmp_path, source, pad_max=0, ablate_sync=True), toy_tokenizer(), log=None)
    assert report.documents == 1 and not report.skipped
    doc = one_epoch(it)[0]
    p = len(prompt_ids(question(0)))
    # Same tokens as the released text-level removal before tokenization.
    expected = prompt_ids(question(0)) + encode(completion.replace("<sync/>", "")) + [toy_ids().eos]
    np.testing.assert_array_equal(doc["tokens"], expected)

    # The released mask for data without <sync/>, built here from the tokens: causal outside
    # blocks, bidirectional inside a block, and no token outside a block ever sees into one.
    ids = toy_ids()
    toks = list(doc["tokens"])
    block = np.zeros(len(toks), int)
    current = 0
    for i, t in enumerate(toks):
        if t == ids.async_start:
            current = block.max() + 1
        block[i] = current
        if t == ids.async_end:
            current = 0
    n = len(toks)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    expected_mask = ((block[i] == block[j]) & (block[j] > 0)) | ((block[j] == 0) & (j <= i))
    seg = Segments(*(doc[f] for f in Segments._fields))
    np.testing.assert_array_equal(attention_mask(seg), expected_mask)
    assert np.all(seg.visible_from[block > 0] == NEVER)
    assert np.all(seg.role[:p] == Role.PROMPT)


def test_ar_only_and_diffusion_only_strip_the_plan(tmp_path):
    completion = "alpha <promise>-<topic>beta 1</topic><async>gamma delta</async><sync/>epsilon"
    rows = [{"prompt": question(0), "completion": completion}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    clean = prompt_ids(question(0)) + encode("alpha gamma delta epsilon") + [toy_ids().eos]
    p = len(prompt_ids(question(0)))

    it, _ = build_pipeline(toy_config(tmp_path, source, mode="ar_only"), toy_tokenizer(), log=None)
    doc = one_epoch(it)[0]
    np.testing.assert_array_equal(doc["tokens"], clean)
    assert np.all(doc["block_id"] == 0) and np.all(doc["role"][p:] == Role.PLAN)

    it, _ = build_pipeline(toy_config(tmp_path, source, mode="diffusion_only"), toy_tokenizer(), log=None)
    doc = one_epoch(it)[0]
    np.testing.assert_array_equal(doc["tokens"], clean)
    assert np.all(doc["block_id"][p - 1 :] == 1) and np.all(doc["role"][p:] == Role.SPAN)


def test_diffusion_only_eos_fill(tmp_path):
    rows = [
        {"prompt": question(0), "completion": "alpha <promise>-<topic>beta 1</topic><async>gamma</async>"},
        {"prompt": question(1), "completion": "delta " * 12},
    ]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = toy_config(tmp_path, source, mode="diffusion_only", eos_fill_length=8)
    it, report = build_pipeline(cfg, toy_tokenizer(), log=None)
    assert report.skipped_by_rule == {"response-too-long": 1} and report.skipped[0].row == 1
    doc = one_epoch(it)[0]
    p = len(prompt_ids(question(0)))
    eos = toy_ids().eos
    np.testing.assert_array_equal(doc["tokens"][p:], encode("alpha gamma") + [eos] * 6)
    assert np.all(doc["role"][p:] == Role.SPAN)  # the filler <|im_end|>s are diffusion targets too
    with pytest.raises(ValueError, match="diffusion_only"):
        DataConfig(source="x", eos_fill_length=8)


def pad_counts(docs: dict[int, dict[str, np.ndarray]]) -> dict[tuple[int, int], int]:
    """(row, span index) -> number of [PAD] tokens in that span."""
    pad = toy_ids().pad
    out = {}
    for row, doc in docs.items():
        blocks = [b for b in dict.fromkeys(doc["block_id"]) if b]
        for k, b in enumerate(blocks):
            out[(row, k)] = int(np.sum(doc["tokens"][doc["block_id"] == b] == pad))
    return out


@pytest.fixture(scope="module")
def pad_epochs(tmp_path_factory):
    """Two epochs of 120 annotated rows, twice with seed 0 and once with seed 1."""
    tmp = tmp_path_factory.mktemp("pads")
    source = write_jsonl(tmp / "d.jsonl", toy_rows(120, seed=3))
    runs = {}
    for seed, tag in ((0, "a"), (0, "b"), (1, "c")):
        cfg = toy_config(tmp, source, seed=seed, num_epochs=2, row_length=192, batch_size=4)
        it, report = build_pipeline(cfg, toy_tokenizer(), log=None)
        runs[tag] = (list(it), report)
    return runs


def epoch_pads(batches, report) -> list[dict[tuple[int, int], int]]:
    """Each epoch's pad counts; every lane (row of the batch) runs through its epochs on its own."""
    per_epoch: list[dict[tuple[int, int], int]] = [{} for _ in report.rows_per_epoch]
    for lane in range(len(batches[0]["tokens"])):
        epoch, seen = 0, set()
        for batch in batches:
            docs = one_epoch([{k: v[lane : lane + 1] for k, v in batch.items()}])
            if seen & docs.keys():  # a document again: the lane's next epoch began
                epoch, seen = epoch + 1, set()
            seen |= docs.keys()
            per_epoch[epoch].update(pad_counts(docs))
    return per_epoch


def test_pad_draw_is_uniform_fresh_each_epoch_and_seeded(pad_epochs):
    first, second = epoch_pads(*pad_epochs["a"])
    assert first.keys() == second.keys() and len(first) > 300
    counts = Counter(first.values()) + Counter(second.values())
    assert set(counts) == set(range(11))  # U{0..10}
    values = np.array(list(first.values()) + list(second.values()))
    assert abs(values.mean() - 5.0) < 0.35  # sd of the mean is ~0.14 here
    expected = len(values) / 11
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(11))
    assert chi2 < 35  # 10 dof: p < 1e-4 above this
    same = np.mean([first[k] == second[k] for k in first])
    assert same < 0.2  # a fresh draw matches the last epoch's with probability 1/11

    assert pad_epochs["a"][1].fingerprint == pad_epochs["b"][1].fingerprint != pad_epochs["c"][1].fingerprint
    again = epoch_pads(*pad_epochs["b"])
    assert again == [first, second]
    other = epoch_pads(*pad_epochs["c"])[0]
    assert np.mean([first[k] == other[k] for k in first]) < 0.2
    for x, y in zip(pad_epochs["a"][0], pad_epochs["b"][0]):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_pad_max_bounds_the_draw(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", toy_rows(30, seed=4))
    it, _ = build_pipeline(toy_config(tmp_path, source, pad_max=2, row_length=128), toy_tokenizer(), log=None)
    counts = pad_counts(one_epoch(it))
    assert set(counts.values()) == {0, 1, 2}
