"""The `synthetic:` data source: parsed, built once into its folder (seeded, identical to the CLI), reused, read."""

import json

import pytest

from pdjax.data import DataConfig, load_source, prepare_source
from pdjax.data.synthetic_source import STAMP, ensure_synthetic, is_synthetic, parse_spec
from pdjax.synthetic.__main__ import main as synthetic_main


def test_parse_spec_reads_every_key_and_rejects_unknown_ones():
    spec = parse_spec("synthetic:runs/x?seed=3&num_train=50&num_heldout=7&vocab_size=600&chatterbot=true&plain=0.5")
    assert (spec.path, spec.seed, spec.num_train, spec.num_heldout) == ("runs/x", 3, 50, 7)
    assert spec.vocab_size == 600 and spec.chatterbot and spec.mix == (("plain", 0.5),)
    assert spec.file("heldout") == "runs/x/heldout.jsonl" and spec.tokenizer_path == "runs/x/tokenizer"
    assert is_synthetic("synthetic:runs/x") and not is_synthetic("runs/x/train.jsonl")
    with pytest.raises(ValueError, match="unknown key 'sed'"):
        parse_spec("synthetic:runs/x?sed=3")
    with pytest.raises(ValueError, match="name the data folder"):
        parse_spec("synthetic:?seed=3")
    with pytest.raises(ValueError, match="splits"):
        spec.file("validation")


def test_built_once_identical_to_the_cli_reused_and_read(tmp_path):
    source = f"synthetic:{tmp_path / 'data'}?seed=5&num_train=120&num_heldout=12"
    messages = []
    prepare_source(DataConfig(source=source), log=messages.append)
    assert len(messages) == 4 and "building" in messages[0] and messages[1].startswith("drawing 120 train and 12")
    spec = parse_spec(source)

    # The same bytes as `python -m pdjax.synthetic` with the same settings (a different folder).
    assert synthetic_main(["--out", str(tmp_path / "cli"), "--seed", "5", "--num_train", "120", "--num_heldout", "12"]) == 0
    for name in ("train.jsonl", "heldout.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / "data" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes(), name

    # Reused without rebuilding (the stamp is not rewritten), and read split by split.
    stamp = tmp_path / "data" / STAMP
    before = stamp.stat().st_mtime_ns
    prepare_source(DataConfig(source=source), log=messages.append)
    assert len(messages) == 4 and stamp.stat().st_mtime_ns == before
    train = load_source(DataConfig(source=source))
    heldout = load_source(DataConfig(source=source, split="heldout"))
    assert len(train) == 120 and len(heldout) == 12
    expected = [json.loads(line)["prompt"] for line in open(spec.file("heldout"))]
    assert list(heldout["prompt"]) == expected
    assert not set(train["prompt"]) & set(heldout["prompt"])

    # Other settings for the same folder are refused rather than silently mixed.
    with pytest.raises(ValueError, match="delete the folder"):
        ensure_synthetic(f"synthetic:{tmp_path / 'data'}?seed=6&num_train=120&num_heldout=12")
    # A folder not made by a synthetic source is never overwritten.
    with pytest.raises(ValueError, match="holds no"):
        ensure_synthetic(f"synthetic:{tmp_path / 'cli'}?seed=5&num_train=120&num_heldout=12")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".synthetic-")]


def test_a_plain_source_is_left_alone(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    messages = []
    prepare_source(DataConfig(source=str(path)), log=messages.append)
    assert messages == [] and len(load_source(DataConfig(source=str(path)))) == 1


@pytest.mark.parametrize("query, says", [
    ("num_train=-3", "need num_train >= 1"),
    ("plain=-1", "non-negative weights"),
    ("bogus=1", "unknown key 'bogus'"),
])
def test_a_bad_synthetic_source_is_a_user_error_naming_it(tmp_path, query, says):
    """`python -m pdjax.train` prints these as one line (a UserError), not a traceback; nothing is written."""
    from pdjax.cli_errors import UserError

    source = f"synthetic:{tmp_path / 'd'}?{query}"
    with pytest.raises(UserError, match=says) as err:
        prepare_source(DataConfig(source=source))
    assert source in str(err.value) and [p.name for p in tmp_path.iterdir()] == []
