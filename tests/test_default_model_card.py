"""The default models' cards: their held-out figures are those `scripts/default_model.py eval` measured on the
shipped folders (the summaries record the weights' SHA-256; `card` refuses others), side by side for the three
models, with the PD-AR comparison said plainly (issue 30)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "pdjax" / "assets" / "default_model"
KINDS = ("pd", "ar", "diffusion")


def tool():
    spec = importlib.util.spec_from_file_location("default_model_tool", ROOT / "scripts" / "default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(folder: Path, mode: str, facts: float, calls: float, **decode) -> dict:
    """An `eval --out` summary of `folder`, as `evaluate` writes it (only the keys the card reads)."""
    return {"mode": mode, "model_dir": str(folder), "weights_sha256": sha256(folder / "model.safetensors"),
            "answers": 500, "well_formed": 1.0, "planned": 0.8 if mode == "pd" else 0.0,
            "span_accuracy": 0.4 if mode == "pd" else None, "fact_accuracy": facts, "model_calls_mean": calls,
            "by_shape": {}, "decode": {"max_length": 512, "temperature": 0.0, "steps_ratio": 1.0,
                                       "diffusion_masks": 64 if mode == "diffusion" else None, **decode}}


@pytest.fixture()
def shipped_copy(tmp_path):
    for kind in KINDS:
        shutil.copytree(ASSETS / kind, tmp_path / kind)
    return tmp_path


def test_card_tables_the_three_models_and_says_why_pd_trails(shipped_copy):
    dm = tool()
    summaries = [summary(shipped_copy / "pd", "pd", 0.412, 31.5), summary(shipped_copy / "ar", "ar", 0.617, 22.69),
                 summary(shipped_copy / "diffusion", "diffusion", 0.004, 65.0)]
    dm.write_card(str(shipped_copy / "pd"), "pd", str(ROOT / "configs" / "default_model.yaml"), summaries)
    card = (shipped_copy / "pd" / "README.md").read_text()
    assert "| **pd** (this model) | 500 | 41.2 % | 31.50 | 100.0 % | 80.0 % |" in card
    assert "| ar | 500 | 61.7 % | 22.69 | 100.0 % | 0.0 % |" in card
    assert "| diffusion | 500 | 0.4 % | 65.00 | 100.0 % | 0.0 % |" in card
    assert "The PD model trails the AR baseline in facts: it states 41.2 % of the held-out facts right against AR's 61.7 %" in card
    assert "takes more model calls per answer on average (31.50 against 22.69)" in card
    assert dm.WHY_PD_TRAILS in card and dm.WHY_MORE_CALLS in card
    assert f"`{summaries[1]['weights_sha256'][:16]}` (ar)" in card
    assert "stage 1, the shipped model `pdjax/assets/default_model/ar`" in card  # the recipe names both stages
    # the AR card carries the same table, its own row marked; a PD model that saved calls gets no "more calls" text
    summaries[0]["model_calls_mean"] = 20.0
    dm.write_card(str(shipped_copy / "ar"), "ar", str(ROOT / "configs" / "default_model_ar.yaml"), summaries)
    card = (shipped_copy / "ar" / "README.md").read_text()
    assert "| **ar** (this model) | 500 | 61.7 % |" in card and "| pd | 500 | 41.2 % | 20.00 |" in card
    assert "takes fewer model calls" in card and dm.WHY_PD_TRAILS in card and dm.WHY_MORE_CALLS not in card


def test_card_refuses_figures_measured_elsewhere(shipped_copy):
    dm = tool()
    pd, ar = summary(shipped_copy / "pd", "pd", 0.4, 30.0), summary(shipped_copy / "ar", "ar", 0.6, 22.0)
    config = str(ROOT / "configs" / "default_model.yaml")
    with pytest.raises(SystemExit, match="no --metrics summary of mode pd"):
        dm.write_card(str(shipped_copy / "pd"), "pd", config, [ar])
    other = dict(pd, weights_sha256="0" * 64)  # e.g. the float32 export before the bfloat16 cast
    with pytest.raises(SystemExit, match="measured on other weights"):
        dm.write_card(str(shipped_copy / "pd"), "pd", config, [other, ar])
    sampled = summary(shipped_copy / "pd", "pd", 0.4, 30.0, temperature=0.2)
    with pytest.raises(SystemExit, match="not greedy at steps_ratio 1.0"):
        dm.write_card(str(shipped_copy / "pd"), "pd", config, [sampled, ar])
    (shipped_copy / "ar" / "model.safetensors").write_bytes(b"retrained")  # a sibling changed after its eval
    with pytest.raises(SystemExit, match="measured on other weights"):
        dm.write_card(str(shipped_copy / "pd"), "pd", config, [pd, ar])


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_cards_were_measured_on_the_shipped_weights(kind):
    """Every card's table was measured on the three folders as they are now, on >= 500 held-out prompts."""
    card = (ASSETS / kind / "README.md").read_text()
    hashes = dict((m, h) for h, m in re.findall(r"`([0-9a-f]{16})` \((pd|ar|diffusion)\)", card))
    assert hashes == {k: sha256(ASSETS / k / "model.safetensors")[:16] for k in KINDS}
    rows = re.findall(r"^\| (?:\*\*)?(pd|ar|diffusion)(?:\*\* \(this model\))? \| (\d+) \| ([\d.]+ %) \| ([\d.]+) \|",
                      card, re.M)
    assert [r[0] for r in rows] == list(KINDS) and all(int(r[1]) >= 500 for r in rows)
    assert len((ASSETS / kind / "heldout.jsonl").read_text().splitlines()) == int(rows[0][1])
    others = {k: (ASSETS / k / "README.md").read_text() for k in KINDS}
    table = [line.replace("**", "").replace(" (this model)", "") for line in card.splitlines() if line.startswith("| ")]
    for text in others.values():  # the same figures in all three cards
        assert table == [line.replace("**", "").replace(" (this model)", "") for line in text.splitlines()
                         if line.startswith("| ")]
    facts = {r[0]: float(r[2].rstrip(" %")) for r in rows}
    if facts["pd"] < facts["ar"]:
        assert "The PD model trails the AR baseline in facts" in card and "Why it trails:" in card
