"""Hugging Face folders in and out: what Dream's own loader needs is saved, nothing asks to run remote code,
and the special-token ids the configs name are checked against the tokenizer.

Dream's released loader (``AutoModel.from_pretrained(..., trust_remote_code=True)``) reads config.json and the
modules its ``auto_map`` names (configuration_dream.py, modeling_dream.py, which imports generation_utils.py),
generation_config.json (``DreamGenerationConfig.from_pretrained``), the weights, and the tokenizer files
(tokenizer_config.json naming tokenization_dream.py, with vocab.json + merges.txt or tokenizer.json).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil

import pytest
from flax import nnx

from pdjax.model import DreamConfig, DreamModel, load_pretrained, save_pretrained
from pdjax.model.checkpoint import auto_map_modules
from pdjax.model.tokenizer import TokenIdMismatch, load_tokenizer, special_ids
from pdjax.synthetic.tokenizer import train_tokenizer

REMOTE_FILES = ("configuration_dream.py", "modeling_dream.py", "generation_utils.py", "tokenization_dream.py")
RELEASED_GENERATION_CONFIG = {"alg": "origin", "alg_temp": None, "eps": 0.001, "steps": 512, "max_length": 20,
                              "temperature": 0.0, "top_p": None, "top_k": None, "output_history": False,
                              "return_dict_in_generate": False, "transformers_version": "4.46.2"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["<|im_start|>user\nHello there, name a colour.<|im_end|>\n"] * 4, vocab_size=260,
                           min_frequency=1)


def _dream_folder(root, tokenizer, *, generation_config: bool, **config_changes) -> str:
    """A folder in the released Dream layout: Dream config.json with auto_map, remote code that must never run,
    tokenizer files whose tokenizer_config.json names Dream's tokenizer class."""
    from test_dream import dream_config_json

    folder = root / "dream_src"
    config = DreamConfig.tiny(vocab_size=len(tokenizer))
    save_pretrained(DreamModel(config, rngs=nnx.Rngs(0)), folder, tokenizer=tokenizer)
    os.remove(folder / "generation_config.json")
    vocab = tokenizer.get_vocab()
    ids = {"eos": vocab["<|endoftext|>"], "mask": vocab["<|mask|>"], "pad": vocab["<|endoftext|>"]}
    raw = {**dream_config_json(config, **ids), **config_changes}
    raw["auto_map"] = {**raw["auto_map"], "AutoModelForCausalLM": "Dream-org/Dream-v0-Instruct-7B--modeling_dream.DreamModel"}
    (folder / "config.json").write_text(json.dumps(raw))
    if generation_config:
        released = {**RELEASED_GENERATION_CONFIG, "bos_token_id": ids["eos"], "eos_token_id": ids["eos"],
                    "pad_token_id": ids["pad"], "mask_token_id": ids["mask"]}
        (folder / "generation_config.json").write_text(json.dumps(released))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in REMOTE_FILES:
        (folder / name).write_text(f"raise SystemExit('pdjax ran remote code from {name}')\n")
    return str(folder)


@pytest.mark.parametrize("released_generation_config", [True, False])
def test_saved_dream_fine_tune_holds_every_file_dreams_loader_reads(tokenizer, tmp_path, released_generation_config):
    from transformers import GenerationConfig

    source = _dream_folder(tmp_path, tokenizer, generation_config=released_generation_config)
    out = tmp_path / "fine_tune"
    save_pretrained(load_pretrained(source), out)  # no tokenizer object: its files come from the source folder
    saved = set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    modules = auto_map_modules(config)
    assert modules == ["configuration_dream.py", "modeling_dream.py"]
    needed = {"config.json", "generation_config.json", "model.safetensors", *REMOTE_FILES, "tokenizer_config.json",
              "tokenizer.json", "chat_template.jinja"}
    assert needed <= saved, sorted(needed - saved)
    for name in REMOTE_FILES:  # copied as they were
        assert (out / name).read_text() == (tmp_path / "dream_src" / name).read_text()
    generation = GenerationConfig.from_pretrained(out)
    assert (generation.mask_token_id, generation.eos_token_id, generation.pad_token_id) == (
        config["mask_token_id"], config["eos_token_id"], config["pad_token_id"])
    assert (generation.alg, generation.steps, generation.eps) == ("origin", 512, 0.001)  # Dream's sampler defaults
    if released_generation_config:
        assert json.loads((out / "generation_config.json").read_text()) == json.loads(
            (tmp_path / "dream_src" / "generation_config.json").read_text())
    # and pdjax reads its own output back without asking anything
    assert load_tokenizer(out).encode("Hello") == tokenizer.encode("Hello")


def test_qwen2_save_writes_a_generation_config(tokenizer, tmp_path):
    from transformers import GenerationConfig

    save_pretrained(DreamModel(DreamConfig.tiny(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0)), tmp_path,
                    tokenizer=tokenizer)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    GenerationConfig.from_pretrained(tmp_path)  # reads back
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path))


def _no_questions(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"pdjax asked the user something: {args}")

    monkeypatch.setattr(builtins, "input", refuse)


@pytest.mark.parametrize("layout", ["dream", "qwen2_with_auto_map"])
def test_loading_never_prompts_nor_runs_remote_code(tokenizer, tmp_path, monkeypatch, capsys, layout):
    """A folder whose config.json has auto_map (transformers' "Do you wish to run the custom code? [y/N]" case)."""
    source = _dream_folder(tmp_path, tokenizer, generation_config=True)
    if layout == "qwen2_with_auto_map":  # the tokenizer files of a plain Qwen2 folder, config.json with auto_map
        shutil.copy(tmp_path / "dream_src" / "tokenizer_config.json", tmp_path / "tc.json")
        tok_config = json.loads((tmp_path / "tc.json").read_text())
        tok_config.pop("auto_map")
        tok_config["tokenizer_class"] = "TokenizersBackend"
        (tmp_path / "dream_src" / "tokenizer_config.json").write_text(json.dumps(tok_config))
    _no_questions(monkeypatch)
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    loaded = load_tokenizer(source)
    model = load_pretrained(source)
    ids = special_ids(source, loaded)
    out = capsys.readouterr()
    assert out.out == ""  # stdout is pdjax's alone
    # transformers' question; its log line explaining a refused auto_map may reach stderr, a question may not
    assert "Do you wish to run the custom code" not in out.err + out.out
    vocab = tokenizer.get_vocab()
    assert loaded.encode("Hello there") == tokenizer.encode("Hello there")
    assert loaded.chat_template == tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    assert (ids.mask, ids.pad, ids.eos) == (vocab["<|mask|>"], vocab["<|endoftext|>"], vocab["<|endoftext|>"])
    assert ids.stop == (vocab["<|im_end|>"], vocab["<|endoftext|>"])  # the chat turn's end first


def test_config_ids_that_disagree_with_the_tokenizer_are_named(tokenizer, tmp_path):
    vocab = tokenizer.get_vocab()
    source = _dream_folder(tmp_path, tokenizer, generation_config=False, mask_token_id=vocab["<|im_end|>"])
    with pytest.raises(TokenIdMismatch, match=f"mask_token_id {vocab['<|im_end|>']} .*'<\\|im_end\\|>'.* differs from "
                                              f"the tokenizer's mask token '<\\|mask\\|>' \\({vocab['<|mask|>']}\\)"):
        special_ids(source, load_tokenizer(source))

    ordinary = tokenizer.encode("Hello")[0]
    (tmp_path / "gen").mkdir()
    folder = _dream_folder(tmp_path / "gen", tokenizer, generation_config=True)
    generation = json.loads(open(os.path.join(folder, "generation_config.json")).read())
    generation["eos_token_id"] = [vocab["<|im_end|>"], ordinary]
    (tmp_path / "gen" / "dream_src" / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(TokenIdMismatch, match=f"generation_config.json eos_token_id {ordinary} is .* an ordinary token"):
        special_ids(folder, load_tokenizer(folder))

    generation["eos_token_id"] = [vocab["<|im_end|>"], len(tokenizer) + 5]
    (tmp_path / "gen" / "dream_src" / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(TokenIdMismatch, match="outside the tokenizer's vocabulary"):
        special_ids(folder, load_tokenizer(folder))


def test_eval_refuses_mismatched_ids_in_one_line(tokenizer, tmp_path, capsys):
    from pdjax.eval.cli import main

    vocab = tokenizer.get_vocab()
    source = _dream_folder(tmp_path, tokenizer, generation_config=False, pad_token_id=vocab["<|im_start|>"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "Hello"}\n')
    argv = ["generate", "--mode", "dream", "--model", source, "--prompts", str(prompts), "--output",
            str(tmp_path / "o.json"), "--max_length", "64", "--max_new_tokens", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pad_token_id" in err and "'<|endoftext|>'" in err
