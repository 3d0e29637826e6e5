"""`python -m pdjax.decode` end to end on tiny checkpoints saved by transformers.

The contract (mode ar on a plain Qwen2 folder, greedy, --json) runs in a
subprocess and must reproduce transformers' own greedy `generate`; the other
paths (pd with a prompt file, the terminal view, user errors) call `main` in
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    out = capsys.readouterr().out
    assert code == 0
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


def test_missing_default_model_says_so(capsys, monkeypatch, tmp_path):
    from pdjax.decode import cli

    monkeypatch.setattr(cli, "DEFAULT_MODEL", tmp_path / "absent")
    assert cli.main(["--prompt", "hello"]) == 2
    assert "default model is not shipped" in capsys.readouterr().err


def test_eos_falls_back_to_the_tokenizer_eos(plain_qwen2, planned_qwen2):
    from pdjax.decode.cli import eos_id
    from pdjax.model.tokenizer import load_tokenizer

    plain, planned = load_tokenizer(plain_qwen2), load_tokenizer(planned_qwen2)
    assert eos_id(plain) == plain.convert_tokens_to_ids("<eos>")
    assert eos_id(planned) == planned.convert_tokens_to_ids("<|im_end|>")
    assert np.all([planned.convert_tokens_to_ids(s) > 0 for s in CONTROLS])
