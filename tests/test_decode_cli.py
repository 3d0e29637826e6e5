"""`python -m pdjax.decode` end to end on tiny checkpoints saved by transformers.

The contract (mode ar on a plain Qwen2 folder, greedy, --json) runs in a
subprocess and must reproduce transformers' own greedy `generate`; the other
paths (pd with a prompt file, the terminal view, user errors) call `main` in
process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORDS = [f"w{i}" for i in range(40)]
CONTROLS = ["<promise>-<topic>", "</topic>", "<async>", "</async>", "<sync/>", "[PAD]", "<|mask|>"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def save_tokenizer(path: str, planned: bool) -> int:
    """A whitespace word-level tokenizer; `planned` adds <|im_end|>, the control tags and a chat template."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_end|>"] if planned else ["<unk>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + [str(d) for d in range(10)] + [":", "user", "system",
                                                                                         "assistant"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=specials[1])
    if planned:
        hf.add_tokens([AddedToken(s, normalized=False) for s in CONTROLS])
        hf.chat_template = TEMPLATE
    hf.save_pretrained(path)
    return len(hf)


def save_qwen2(path: str, vocab: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).eval().save_pretrained(path)


SHIPPED = Path(__file__).resolve().parent.parent / "pdjax" / "assets" / "default_model"


@pytest.fixture(autouse=True)
def private_compilation_cache(tmp_path_factory, monkeypatch):
    """Keep the persistent compilation cache these tests turn on out of the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))


@pytest.fixture(scope="module")
def plain_qwen2(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("plain_qwen2"))
    save_qwen2(path, save_tokenizer(path, planned=False) + 3)  # a padded embedding, as real checkpoints
    return path


@pytest.fixture(scope="module")
def planned_qwen2(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("planned_qwen2"))
    save_qwen2(path, save_tokenizer(path, planned=True))
    return path


def test_ar_contract_matches_transformers_greedy(plain_qwen2):
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    prompt, max_length = "w1 w2 w3 w4 w5", 20
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "pdjax.decode", "--model", plain_qwen2, "--prompt", prompt, "--mode", "ar",
           "--temperature", "0", "--max_length", str(max_length), "--no_chat_template", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    record = json.loads(lines[0])

    tokenizer = AutoTokenizer.from_pretrained(plain_qwen2)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    model = Qwen2ForCausalLM.from_pretrained(plain_qwen2, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id  # the plain tokenizer has no <|im_end|>
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_length=max_length, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
    want = out[0, len(ids):].tolist()
    assert record["token_ids"] == want
    assert record["stats"]["model_calls"] == len(want)  # 1 prefill + one AR step per further token
    clean = want[: want.index(eos)] if eos in want else want
    assert record["text"] == tokenizer.decode(clean, skip_special_tokens=True)


def test_pd_json_with_a_prompt_file(planned_qwen2, tmp_path, capsys):
    from pdjax.decode.cli import main

    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('{"prompt": "w1 w2"}\nw3 w4 w5\n\n{"instruction": "w6"}\n')
    code = main(["--model", planned_qwen2, "--prompt-file", str(prompt_file), "--max_length", "40", "--buckets", "40",
                 "--batch_size", "2", "--json", "--seed", "1", "--temperature", "0.7"])
    out, err = capsys.readouterr()
    assert code == 0
    # what it is doing, on stderr (stdout stays one JSON object per prompt)
    assert err.splitlines() == [f"loading {planned_qwen2} ...", "compiling the pd decoder for batch 2 x 40 tokens ...",
                                "decoding prompts 1-2 of 3 in mode pd ...", "decoding prompt 3 of 3 in mode pd ..."]
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["prompt"] for r in records] == ["w1 w2", "w3 w4 w5", "w6"]
    for r in records:
        stats = r["stats"]
        assert stats["model_calls"] == sum(stats[f"{k}_calls"] for k in ("prefill", "plan", "denoise", "commit"))
        assert stats["tokens_generated"] == len(r["token_ids"]) > 0
        assert isinstance(r["text"], str)


def test_terminal_view(plain_qwen2, capsys):
    from pdjax.decode.cli import main

    assert main(["--model", plain_qwen2, "--prompt", "w1 w2", "--mode", "ar", "--max_length", "12",
                 "--no_chat_template", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "answer" in out and "model calls" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "w1", "--buckets", "7,abc"], "argument --buckets: expected comma-separated positive integers"),
        (["--prompt", "w1", "--buckets", "0,64"], "argument --buckets: bucket sizes must be >= 1"),
        (["--prompt", "w1", "--top_p", "2"], "argument --top_p: must be in (0, 1], got 2"),
        (["--prompt", "w1", "--top_p", "0"], "argument --top_p: must be in (0, 1], got 0"),
        (["--prompt", "w1", "--top_k", "0"], "argument --top_k: must be >= 1, got 0"),
        (["--prompt", "w1", "--max_length", "0"], "argument --max_length: must be >= 2, got 0"),
        (["--prompt", "w1", "--max_length", "-5"], "argument --max_length: must be >= 2, got -5"),
        (["--prompt", "w1", "--max_new_tokens", "0"], "argument --max_new_tokens: must be >= 1, got 0"),
        (["--prompt", "w1", "--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
        (["--prompt", "w1", "--max_spans", "-1"], "argument --max_spans: must be >= 1, got -1"),
        (["--prompt", "w1", "--temperature", "-0.1"], "argument --temperature: must be >= 0, got -0.1"),
        (["--prompt", "w1", "--confidence_threshold", "1.5"], "argument --confidence_threshold: must be in [0, 1]"),
        (["--prompt", "w1", "--length_scale", "0"], "argument --length_scale: must be > 0, got 0"),
        (["--prompt", "w1", "--steps_ratio", "nan"], "argument --steps_ratio: must be > 0, got nan"),
        (["--prompt", "w1", "--max_length", "2k"], "argument --max_length: expected an integer, got '2k'"),
        (["--prompt", "  "], "prompt 0 is empty"),
        (["--prompt", " ".join(WORDS), "--max_length", "10", "--mode", "ar"], "max_length 10"),
        (["--prompt", "w1", "--mode", "pd"], "control tokens"),
        (["--prompt", "w1", "--mode", "ar", "--steps_ratio", "0"], "steps_ratio"),
        ([], "no prompt given"),
    ],
)
def test_user_errors_are_clear(plain_qwen2, capsys, argv, message):
    from pdjax.decode.cli import main

    assert main(["--model", plain_qwen2, "--no_chat_template", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1  # one line says what is wrong


def test_bad_flag_in_a_subprocess_exits_2_without_a_traceback():
    cmd = [sys.executable, "-m", "pdjax.decode", "--prompt", "hi", "--top_k", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "python -m pdjax.decode: error: argument --top_k: must be >= 1, got 0"
    assert "Traceback" not in done.stderr


def _copy_shipped(mode: str, dst: Path) -> str:
    shutil.copytree(SHIPPED / mode, dst)
    return str(dst)


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_mode_without_model_uses_the_shipped_model_of_that_mode(mode, monkeypatch, capsys):
    """No --model: the folder loaded is assets/default_model/<mode>, and no mode warning is printed."""
    from pdjax.decode import cli

    loaded: list[str] = []
    real_build = cli.build
    monkeypatch.setattr(cli, "build", lambda args, path: loaded.append(path) or real_build(args, path))
    code = cli.main(["--mode", mode, "--prompt", "Spell the word cat backwards.", "--temperature", "0",
                     "--max_length", "96", "--buckets", "96", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [Path(p).resolve() for p in loaded] == [(SHIPPED / mode).resolve()]
    assert "warning" not in captured.err
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["mode"] == mode and record["text"].strip()  # the model of the mode answers


def test_mode_mismatch_with_a_chosen_model_warns_in_one_line(tmp_path, capsys):
    from pdjax.decode.cli import main

    pd_model = _copy_shipped("pd", tmp_path / "my_pd")
    code = main(["--model", pd_model, "--mode", "ar", "--prompt", "Spell the word cat backwards.",
                 "--temperature", "0", "--max_length", "64", "--buckets", "64", "--max_new_tokens", "4", "--json"])
    err = capsys.readouterr().err
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {pd_model} was trained for mode 'pd', not 'ar': expect empty or malformed answers "
                        f"(drop --model to use the shipped ar model)"]


def test_diffusion_budget_comes_from_the_model_then_a_default(tmp_path, capsys):
    """Mode diffusion without --max_new_tokens: the masks are the model's max_new_tokens (64 for the shipped
    model, whose card says it was trained on answers filled to 64 tokens), or 256 when the folder says nothing;
    never max_length - prompt (here about 480)."""
    from pdjax.decode.cli import main
    from pdjax.decode.model_info import DEFAULT_DIFFUSION_MASKS

    card = (SHIPPED / "diffusion" / "README.md").read_text()
    assert "filled with `<|im_end|>` to 64 tokens" in card
    silent = _copy_shipped("diffusion", tmp_path / "no_generation_config")
    os.remove(os.path.join(silent, "generation_config.json"))
    budgets = []
    for model in (str(SHIPPED / "diffusion"), silent):
        # the number of denoising steps reveals the number of masks; a small steps_ratio keeps the test fast
        code = main(["--model", model, "--mode", "diffusion", "--prompt", "Spell the word cat backwards.",
                     "--steps_ratio", "0.02", "--max_length", "512", "--buckets", "512", "--json"])
        out = capsys.readouterr()
        assert code == 0, out.err
        record = json.loads(out.out.strip().splitlines()[-1])
        budgets.append(record["stats"]["denoise_calls"])
    # steps = int(masks * steps_ratio), at least 1 (METHOD §4): 64 masks -> 1 step, 256 masks -> 5 steps
    assert budgets == [max(1, int(64 * 0.02)), max(1, int(DEFAULT_DIFFUSION_MASKS * 0.02))]


def test_stats_line_separates_compile_and_decode_time_and_profile_prints_phases(plain_qwen2, capsys):
    from pdjax.decode.cli import main

    assert main(["--model", plain_qwen2, "--prompt", "w1 w2", "--mode", "ar", "--max_length", "12",
                 "--no_chat_template", "--temperature", "0", "--profile", "--no_compilation_cache"]) == 0
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())  # rich wraps long lines
    assert "compiling the ar decoder for batch 1 x 12 tokens ..." in captured.err
    assert re.search(r"decode \d+\.\d\d s \(\+ compile \d+\.\d\d s\)", out)
    for phase in ("prefill", "plan", "denoise", "commit"):
        assert re.search(rf"{phase} +\d+ +\d+\.\d{{3}} +\d+\.\d%", out), phase


def test_missing_default_model_says_so(capsys, monkeypatch, tmp_path):
    from pdjax.decode import cli

    monkeypatch.setattr(cli, "default_model_path", lambda mode: str(tmp_path / mode))
    assert cli.main(["--prompt", "hello", "--mode", "diffusion"]) == 2
    err = capsys.readouterr().err
    assert "default diffusion model is not shipped" in err and str(tmp_path / "diffusion") in err


def test_eos_falls_back_to_the_tokenizer_eos(plain_qwen2, planned_qwen2):
    from pdjax.decode.cli import eos_id
    from pdjax.model.tokenizer import load_tokenizer

    plain, planned = load_tokenizer(plain_qwen2), load_tokenizer(planned_qwen2)
    assert eos_id(plain) == plain.convert_tokens_to_ids("<eos>")
    assert eos_id(planned) == planned.convert_tokens_to_ids("<|im_end|>")
    assert np.all([planned.convert_tokens_to_ids(s) > 0 for s in CONTROLS])


def test_default_max_length_is_the_models_positions_at_most_2048(plain_qwen2, capsys):
    """No --max_length: the model's max_position_embeddings (128 for this checkpoint), capped at the released 2048."""
    from pdjax.decode.cli import main

    assert json.loads(open(os.path.join(plain_qwen2, "config.json")).read())["max_position_embeddings"] == 128
    assert main(["--model", plain_qwen2, "--prompt", "w1 w2", "--mode", "ar", "--no_chat_template",
                 "--temperature", "0", "--max_new_tokens", "3", "--json"]) == 0
    assert "compiling the ar decoder for batch 1 x 128 tokens ..." in capsys.readouterr().err
