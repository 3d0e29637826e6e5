"""The v2 default-model recipe (configs/default_model_v2*.yaml): one shared AR stage, three fair stage-2 runs."""

from __future__ import annotations

import dataclasses
import os

import pytest

from pdjax.data.synthetic_source import parse_spec
from pdjax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = {
    "pd": "default_model_v2.yaml",
    "ar": "default_model_v2_ar.yaml",
    "diffusion": "default_model_v2_diffusion.yaml",
}


def _load(name: str):
    return load_config(os.path.join(ROOT, "configs", name))


def test_base_is_ar_on_the_paper_data():
    base = _load("default_model_v2_base.yaml")
    assert base.data.mode == "ar_only" and base.model.preset is not None and base.model.checkpoint is None
    assert parse_spec(base.data.source).tasks == "paper"


@pytest.mark.parametrize("run", sorted(STAGE2))
def test_stage2_starts_from_the_base_export_with_the_same_budget(run):
    base = _load("default_model_v2_base.yaml")
    cfg = _load(STAGE2[run])
    assert cfg.model.checkpoint == base.checkpoint.export_dir
    assert cfg.data.mode == {"pd": "planned", "ar": "ar_only", "diffusion": "diffusion_only"}[run]
    assert cfg.data.source == base.data.source and cfg.model.tokenizer == base.model.tokenizer
    pd = _load(STAGE2["pd"])
    # a fair comparison: same steps, batch, row length, optimizer, loss recipe and seed as the PD run
    assert (cfg.steps, cfg.data.batch_size, cfg.data.row_length, cfg.seed) == (
        pd.steps, pd.data.batch_size, pd.data.row_length, pd.seed,
    )  # fmt: skip
    assert dataclasses.asdict(cfg.optimizer) == dataclasses.asdict(pd.optimizer) and cfg.loss == pd.loss
    # every run writes its own folders
    assert f"/{run}/" in cfg.checkpoint.dir and f"/{run}/" in cfg.checkpoint.export_dir


def test_diffusion_fill_covers_the_longest_answer(tmp_path):
    """Longer answers would be skipped by the diffusion run (eos_fill_length), so the fill must hold them all."""
    from pdjax.synthetic import build_dataset

    cfg = _load(STAGE2["diffusion"])
    stats = build_dataset(tmp_path, 0, 1000, 100, tasks="paper")
    longest = max(stats[s]["answer_tokens_without_plan"]["max"] for s in ("train", "heldout"))  # with <|im_end|>
    assert longest <= cfg.data.eos_fill_length


def test_planned_rows_hold_the_longest_example_with_its_pad(tmp_path):
    """The PD run must not skip the longest answers (up to `pad_max` [PAD] per span): the baselines see them all.

    With rows of 512, 2,528 of the 20,000 training examples (the longest, mostly two-round) were skipped
    as too long in the PD run only.
    """
    from pdjax.data.pipeline import prepare_corpus
    from pdjax.model.tokenizer import control_ids, load_tokenizer
    from pdjax.synthetic import build_dataset

    cfg = _load(STAGE2["pd"])
    build_dataset(tmp_path, 0, 2000, 100, tasks="paper")
    data = dataclasses.replace(cfg.data, source=str(tmp_path / "train.jsonl"), skipped_path=None, batch_size=1)
    tokenizer = load_tokenizer(tmp_path / "tokenizer")
    _, skipped, read = prepare_corpus(data, tokenizer, control_ids(tokenizer), range(1))
    assert read == 2000 and [s.detail for s in skipped] == []
