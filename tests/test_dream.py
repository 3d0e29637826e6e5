"""Mode dream: Dream's own `diffusion_generate` (METHOD §4, last paragraphs), checked token for token.

The reference below is written from the description alone, in PyTorch, on the
model as transformers computes it (Qwen2 weights, a full bidirectional mask):
x = prompt + masks; each step the whole sequence, logits shifted right by one;
timesteps torch.linspace(1, 1e-3, steps + 1); int(num_mask * (1 - s/t)) masks
transferred (all at the last step), the top-k by confidence; `origin` moves each
mask with probability 1 - s/t. Only `origin`'s uniforms are pdjax's (the test
feeds the reference the same numbers, `origin_uniforms`). The tiny random model's
head is scaled up so that its distributions are peaked and confidences are far
apart (no near-ties for float rounding to flip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from pdjax.decode import DecodeInputError
from pdjax.decode.dream import (
    DREAM_ALGS,
    DreamDecoder,
    DreamOptions,
    DreamSamplerConfig,
    origin_uniforms,
    schedule,
)
from pdjax.model import DreamConfig, DreamModel, load_pretrained, save_pretrained
from pdjax.synthetic.tokenizer import train_tokenizer

MAX_LENGTH = 32
NEW = 12
PROMPTS = [[5, 17, 42, 9, 77, 3], [8, 1, 60, 23]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dream_config_json(config: DreamConfig, *, eos: int, mask: int, pad: int) -> dict:
    """A config.json in the released Dream layout (model_type Dream, auto_map to remote code)."""
    return {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad, "mask_token_id": mask,
        "hidden_act": "silu", "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings, "max_window_layers": config.num_layers,
        "model_type": "Dream", "num_attention_heads": config.num_heads, "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads, "rms_norm_eps": config.rms_norm_eps, "rope_scaling": None,
        "rope_theta": config.rope_theta, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False,
        "vocab_size": config.vocab_size, "attention_dropout": 0.0,
    }


# Remote code that must never run: importing it ends the process with a message.
REMOTE_CODE = "raise SystemExit('pdjax ran remote code from {name}')\n"
REMOTE_FILES = ("configuration_dream.py", "modeling_dream.py", "generation_utils.py", "tokenization_dream.py")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The same tiny random weights as a Qwen2 folder (for transformers) and a Dream-layout folder (for pdjax)."""
    root = tmp_path_factory.mktemp("dream")
    tokenizer = train_tokenizer(["<|im_start|>user\nHello there, name a colour.<|im_end|>\n"] * 4 +
                                ["<|im_start|>assistant\nBlue is a colour. Red too.<|im_end|>\n"] * 4,
                                vocab_size=300, min_frequency=1)
    config = DreamConfig.tiny(vocab_size=len(tokenizer))
    model = DreamModel(config, rngs=nnx.Rngs(2))
    # sharp, position-dependent attention and peaked heads: confidences ~1e-3 apart (float error ~1e-5)
    model.lm_head[...] = model.lm_head[...] * 20.0
    for name, factor in (("q_proj", 30.0), ("k_proj", 30.0), ("v_proj", 5.0), ("o_proj", 5.0), ("gate_proj", 5.0),
                         ("up_proj", 5.0), ("down_proj", 5.0)):
        weight = getattr(model.layers, name)
        weight[...] = weight[...] * factor
    qwen, dream = root / "qwen2", root / "dream"
    save_pretrained(model, qwen, tokenizer=tokenizer)
    dream.mkdir()
    for f in os.listdir(qwen):
        if f != "config.json" and f != "generation_config.json":
            shutil.copy(qwen / f, dream / f)
    vocab = tokenizer.get_vocab()
    raw = dream_config_json(config, eos=vocab["<|endoftext|>"], mask=vocab["<|mask|>"], pad=vocab["<|endoftext|>"])
    (dream / "config.json").write_text(json.dumps(raw))
    tok_config = json.loads((dream / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="DreamTokenizer",
                      auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (dream / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in REMOTE_FILES:
        (dream / name).write_text(REMOTE_CODE.format(name=name))
    return qwen, dream, vocab["<|mask|>"], vocab["<|im_end|>"]


@pytest.fixture(scope="module")
def hf_model(folders):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(folders[0], attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def decoder(folders):
    _, dream, mask, eos = folders
    config = DreamSamplerConfig(max_length=MAX_LENGTH, batch_size=1)
    return DreamDecoder.from_model(load_pretrained(dream), mask_id=mask, eos_ids=[eos], config=config)


def reference_dream(hf, prompt: list[int], mask_id: int, new: int, steps_ratio: float, alg: str,
                    seed: int = 0) -> tuple[list[int], float]:
    """Dream's diffusion_generate from the description, greedy (temperature 0, no top-p/top-k), in PyTorch.

    Also returns the smallest margin any decision had (top-1 vs top-2 token probability; k-th vs k+1-th
    confidence), so the test can tell that float rounding cannot have decided it."""
    margin = float("inf")
    x = torch.tensor([prompt + [mask_id] * new], dtype=torch.long)
    length = x.shape[1]
    steps = int(new * steps_ratio)
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    full = {"full_attention": torch.zeros((1, 1, length, length))}  # every token sees every token
    position = torch.arange(length)[None]
    for i in range(steps):
        mask_index = x == mask_id
        if not mask_index.any():  # origin may finish early; the remaining steps change nothing
            continue
        with torch.no_grad():
            logits = hf(input_ids=x, attention_mask=full, position_ids=position).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # position j reads the logits of j-1
        probs = torch.softmax(logits[mask_index].float(), dim=-1)
        confidence, x0 = probs.max(dim=-1)  # greedy: the most likely token and its probability
        ranked = torch.sort(probs, dim=-1, descending=True).values
        margin = min(margin, float((ranked[:, 0] - ranked[:, 1]).min()))
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            u = torch.tensor(origin_uniforms(seed, 0, i, MAX_LENGTH)[:length])[mask_index[0]]
            moved = u < p_transfer
            x[mask_index] = torch.where(moved, x0, torch.full_like(x0, mask_id))
            continue
        if alg == "topk_margin":
            top = torch.sort(probs, dim=-1, descending=True).values
            confidence = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
        full_confidence = torch.full(x.shape, -torch.inf)
        full_confidence[mask_index] = confidence
        if 0 < k < int(num_mask):
            ranked = torch.sort(confidence, descending=True).values
            margin = min(margin, float(ranked[k - 1] - ranked[k]))
        if k > 0:
            chosen = torch.topk(full_confidence, k).indices[0]
            candidate = torch.full_like(x, mask_id)
            candidate[mask_index] = x0
            x[0, chosen] = candidate[0, chosen]
    return x[0, len(prompt):].tolist(), margin


def _answer(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("steps_ratio", [1.0, 0.5])
@pytest.mark.parametrize("alg", DREAM_ALGS)
def test_greedy_dream_is_token_identical_to_the_reference(decoder, hf_model, folders, alg, steps_ratio):
    _, _, mask, eos = folders
    options = DreamOptions(alg=alg, steps_ratio=steps_ratio, temperature=0.0, max_new_tokens=NEW, seed=0)
    (result,) = decoder.generate([PROMPTS[0]], options)
    expected, margin = reference_dream(hf_model, PROMPTS[0], mask, NEW, steps_ratio, alg)
    assert margin > 1e-4  # no decision was a near-tie (a predicted <|mask|> may stay: Dream bans no token)
    assert result.token_ids == _answer(expected, eos)
    assert result.stats.model_calls == result.stats.denoise_calls == int(NEW * steps_ratio)
    assert result.stats.finish_reason == ("eos" if eos in expected else "length")


def test_batch_rows_match_their_own_reference(folders, hf_model):
    """Two prompts of different lengths decoded together: each row is Dream's answer to it alone."""
    _, dream, mask, eos = folders
    config = DreamSamplerConfig(max_length=MAX_LENGTH, batch_size=2)
    batched = DreamDecoder.from_model(load_pretrained(dream), mask_id=mask, eos_ids=[eos], config=config)
    options = DreamOptions(alg="topk_margin", steps_ratio=0.5, temperature=0.0, max_new_tokens=NEW)
    results = batched.generate(PROMPTS, options)
    for prompt, result in zip(PROMPTS, results):
        expected, margin = reference_dream(hf_model, prompt, mask, NEW, 0.5, "topk_margin")
        assert result.token_ids == _answer(expected, eos) and margin > 1e-4


def test_transfer_schedule_matches_torch_float32():
    """The transfer counts of every step, from pdjax's float32 schedule and from torch's own linspace/arithmetic."""
    for new in range(1, 200):
        for ratio in (1.0, 0.5, 0.25):
            steps = int(new * ratio)
            if steps < 1:
                continue
            t = torch.linspace(1, 1e-3, steps + 1)
            ours, theirs, left_ours, left_theirs = [], [], new, new
            fraction = schedule(steps)
            for i in range(steps):
                k = int(np.float32(left_ours) * fraction[i]) if i < steps - 1 else left_ours
                ours.append(k)
                left_ours -= k
                num = torch.tensor([left_theirs]).sum() / 1
                j = int(num * (1 - t[i + 1] / t[i])) if i < steps - 1 else int(num)
                theirs.append(j)
                left_theirs -= j
            assert ours == theirs, (new, ratio)
            assert sum(ours) == new


def test_sampling_is_seeded_and_fills_every_mask(decoder, folders):
    _, _, mask, _ = folders
    options = DreamOptions(alg="entropy", alg_temp=0.5, temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=NEW,
                           seed=11)
    one = decoder.generate([PROMPTS[0]], options)[0]
    again = decoder.generate([PROMPTS[0]], options)[0]
    other = decoder.generate([PROMPTS[0]], DreamOptions(**{**options.__dict__, "seed": 12}))[0]
    assert one.token_ids == again.token_ids and mask not in one.token_ids
    assert other.token_ids != one.token_ids
    assert decoder.compiled_programs() == 1  # knobs, algs and ratios never recompile


def test_refuses_what_cannot_run(decoder):
    with pytest.raises(DecodeInputError, match="max_length >= 39"):
        decoder.generate([list(range(7))], DreamOptions(max_new_tokens=32))
    with pytest.raises(DecodeInputError, match="steps"):
        decoder.generate([PROMPTS[0]], DreamOptions(max_new_tokens=3, steps_ratio=0.25))
    with pytest.raises(ValueError, match="unknown alg"):
        DreamOptions(alg="low_confidence")


def test_cli_mode_dream_on_a_dream_layout_folder_never_prompts_nor_runs_remote_code(folders):
    """`python -m pdjax.decode --mode dream --json` on a released-layout folder, stdin closed: JSON lines only."""
    _, dream, _, _ = folders
    argv = [sys.executable, "-m", "pdjax.decode", "--mode", "dream", "--model", str(dream), "--prompt", "Hello",
            "--prompt", "Name a colour", "--json", "--temperature", "0", "--alg", "maskgit_plus",
            "--max_new_tokens", "8", "--max_length", "64"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "remote code" not in done.stdout + done.stderr and "[y/N]" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    records = [json.loads(line) for line in lines]  # nothing but pdjax's JSON lines on stdout
    assert [r["prompt"] for r in records] == ["Hello", "Name a colour"]
    assert all(r["mode"] == "dream" and r["stats"]["model_calls"] == 8 for r in records)


def test_eval_generate_mode_dream(folders, tmp_path):
    from pdjax.eval import read_outputs
    from pdjax.eval.cli import main

    _, dream, _, _ = folders
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Hello"}\n{"instruction": "Name a colour"}\n')
    out = str(tmp_path / "dream.json")
    argv = ["generate", "--mode", "dream", "--model", str(dream), "--prompts", str(prompts), "--output", out,
            "--max_length", "64", "--max_new_tokens", "8", "--temperature", "0", "--alg", "origin"]
    assert main(argv) == 0
    rows = read_outputs(out)
    assert [r["mode"] for r in rows] == ["dream", "dream"] and rows[0]["generator"] == "pdjax-dream-dream-sr1-origin"
    assert all(r["model_calls"] == 8 and r["prefill_calls"] == 0 and r["spans"] == 0 for r in rows)
    assert main(argv[:-2] + ["--alg", "origin", "--alg_temp", "-1"]) == 2  # a bad knob: one line, exit 2
