"""pdjax.eval: outputs files from a tiny saved model, resume after an interruption, shards, and `compare`.

A tiny random Dream model and a small BPE tokenizer (with the control tokens)
are saved as a Hugging Face folder and decoded on 3 prompts from a local
file. Records are checked against what the test recomputes from their token
ids; `compare`'s ratios against means computed here with NumPy.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from pdjax.decode import DecodeConfig, DecodeOptions
from pdjax.eval import (
    SettingsMismatch,
    generate_outputs,
    load_eval_model,
    load_prompts,
    read_outputs,
    win_rate,
)
from pdjax.eval.cli import OPTION_FLAGS, build_parser, main, options_from_args
from pdjax.model import DreamConfig, DreamModel, save_pretrained
from pdjax.model.tokenizer import control_ids
from pdjax.synthetic.tokenizer import train_tokenizer

MAX_LENGTH = 32  # one window bucket (32) besides plan steps: a quick compile
PROMPTS = [
    {"instruction": "What is 12 plus 3?", "dataset": "toy"},
    {"prompt": "Name a day of the week."},
    "Hi",
]
ALPACA_FIELDS = ("instruction", "output", "generator", "dataset")
GREEDY = DecodeOptions(temperature=0.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny model folder (weights + tokenizer) and a JSONL prompts file."""
    root = tmp_path_factory.mktemp("eval")
    texts = ["<|im_start|>user\nWhat is 12 plus 3? Name a day of the week. Hi<|im_end|>\n"] * 4 + [
        "<|im_start|>assistant\nThe sum is 15. Monday is a day. 0123456789<|im_end|>\n"
    ] * 4
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    config = DreamConfig.tiny(vocab_size=len(tokenizer))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: DreamModel(config, rngs=nnx.Rngs(0))))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(DreamModel(config, rngs=nnx.Rngs(0))))())  # one compile
    save_pretrained(model, root / "model", tokenizer=tokenizer)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root


@pytest.fixture(scope="module")
def pd_model(files):
    config = DecodeConfig(mode="pd", max_length=MAX_LENGTH)
    return load_eval_model(str(files / "model"), config, system_prompt="")


@pytest.fixture(scope="module")
def prompts(files):
    return load_prompts(str(files / "prompts.jsonl"))


@pytest.fixture(scope="module")
def pd_outputs(pd_model, prompts, files):
    """An uninterrupted run: the reference the interrupted one must reproduce."""
    out = str(files / "pd_full.json")
    report = generate_outputs(pd_model, prompts, out, options=GREEDY, generator="tiny-pd")
    assert report.written == 3 and report.assembly is not None and not report.assembly.missing
    return out


def clean_reference(token_ids: list[int], tokenizer) -> str:
    """METHOD §4 step 6 written out here: cut at <|im_end|>, drop promises (whole), tags, [PAD], masks."""
    ids = control_ids(tokenizer)
    kept, in_promise = [], False
    for t in token_ids:
        if t == ids.eos:
            break
        if in_promise:
            in_promise = t != ids.promise_end
        elif t == ids.promise_start:
            in_promise = True
        elif t not in ids.control_set:
            kept.append(t)
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


def test_outputs_file_is_alpaca_eval_format_with_honest_stats(pd_outputs, pd_model):
    raw = json.load(open(pd_outputs))
    # alpaca_eval hashes every field of a record: scalars and strings only
    assert all(v is None or isinstance(v, (str, int, float, bool)) for r in raw for v in r.values())
    assert all(isinstance(r["token_ids"], str) and isinstance(r["span_lengths"], str) for r in raw)
    rows = read_outputs(pd_outputs)  # the id lists come back as lists
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["instruction"] for r in rows] == ["What is 12 plus 3?", "Name a day of the week.", "Hi"]
    assert [r["dataset"] for r in rows] == ["toy", "prompts", "prompts"]
    ids = control_ids(pd_model.tokenizer)
    for r in rows:
        assert all(isinstance(r[k], str) for k in ALPACA_FIELDS) and r["generator"] == "tiny-pd"
        toks = r["token_ids"]
        assert r["output"] == clean_reference(toks, pd_model.tokenizer)
        assert r["tokens"] == len(toks) and r["spans"] == toks.count(ids.async_start) == len(r["span_lengths"])
        assert r["model_calls"] == r["prefill_calls"] + r["plan_calls"] + r["denoise_calls"] + r["commit_calls"]
        assert r["prefill_calls"] == 1 and r["latency_s"] > 0 and r["batch_fill"] == 1
        assert r["prompt_tokens"] == len(pd_model.encode(r["instruction"]))
        assert r["prompt_tokens"] + r["tokens"] <= MAX_LENGTH
        if r["finish_reason"] == "eos":
            assert toks[-1] == ids.eos
        if r["spans"] == 0:  # a plan-only answer: one call per token (the prefill gives the first)
            assert r["model_calls"] == r["tokens"]


def test_interrupted_run_resumes_without_loss_or_duplicates(pd_model, prompts, pd_outputs, files):
    out = str(files / "pd_resumed.json")
    first = generate_outputs(pd_model, prompts, out, options=GREEDY, generator="tiny-pd", stop_after=1)
    assert first.written == 1 and first.assembly.missing == [1, 2] and not os.path.exists(out)
    (part,) = _parts(out)
    # a crash in the middle of the next write leaves half a line behind
    with open(part, "a") as f:
        f.write('{"instruction": "Name a day of the week.", "output": "cut sh')

    second = generate_outputs(pd_model, prompts, out, options=GREEDY, generator="tiny-pd")
    assert (second.written, second.already_done) == (2, 1)
    assert second.assembly.duplicates == 0 and not second.assembly.missing
    lines = [json.loads(line) for p in _parts(out) for line in open(p)]
    assert sorted(r["index"] for r in lines) == [0, 1, 2]  # the cut line is gone, nothing twice

    resumed, full = json.load(open(out)), json.load(open(pd_outputs))
    keys = ("instruction", "output", "token_ids", "model_calls")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]

    again = generate_outputs(pd_model, prompts, out, options=GREEDY, generator="tiny-pd")
    assert (again.written, again.already_done) == (0, 3) and len(json.load(open(out))) == 3


def _parts(output: str) -> list[str]:
    folder = output + ".parts"
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jsonl"))


def test_shards_split_the_prompts_and_assemble_once_all_are_done(pd_model, prompts, pd_outputs, files):
    out = str(files / "pd_sharded.json")
    one = generate_outputs(pd_model, prompts, out, options=GREEDY, generator="tiny-pd", shard_index=1, num_shards=2)
    assert one.written == 1 and one.assembly.missing == [0, 2]  # shard 1 of 2 holds prompt 1
    zero = generate_outputs(pd_model, prompts, out, options=GREEDY, generator="tiny-pd", shard_index=0, num_shards=2)
    assert zero.written == 2 and not zero.assembly.missing
    assert [r["output"] for r in read_outputs(out)] == [r["output"] for r in read_outputs(pd_outputs)]


def test_resume_refuses_other_settings(pd_model, prompts, pd_outputs):
    with pytest.raises(SettingsMismatch, match="steps_ratio"):
        generate_outputs(pd_model, prompts, pd_outputs, options=DecodeOptions(temperature=0.0, steps_ratio=0.5),
                         generator="tiny-pd")


def test_cli_generate_on_two_devices_then_compare(files, pd_outputs, capsys):
    ar_out = str(files / "ar.json")
    argv = ["generate", "--mode", "ar", "--model", str(files / "model"), "--prompts", str(files / "prompts.jsonl"),
            "--output", ar_out, "--max_length", str(MAX_LENGTH), "--system_prompt", "",
            "--temperature", "0", "--devices", "2"]
    assert main(argv) == 0
    rows = read_outputs(ar_out)
    assert [r["index"] for r in rows] == [0, 1, 2] and {r["mode"] for r in rows} == {"ar"}
    assert rows[0]["generator"] == "pdjax-model-ar"
    assert len(_parts(ar_out)) == 2  # one part file per device worker
    for r in rows:
        assert r["model_calls"] == r["tokens"] and r["spans"] == 0  # AR: one call per token

    table = str(files / "table.json")
    assert main(["compare", pd_outputs, ar_out, "--json", table]) == 0
    printed = capsys.readouterr().out
    pd_rows = read_outputs(pd_outputs)
    lat = {k: np.mean([r["latency_s"] for r in v]) for k, v in (("ar", rows), ("pd", pd_rows))}
    calls = {k: np.mean([r["model_calls"] for r in v]) for k, v in (("ar", rows), ("pd", pd_rows))}
    got = json.load(open(table))
    assert got["reference"] == ar_out and got["paired"] == 3
    pd_row = next(r for r in got["rows"] if r["path"] == pd_outputs)
    assert math.isclose(pd_row["speedup"], lat["ar"] / lat["pd"], rel_tol=1e-9)
    assert math.isclose(pd_row["critical_path_ratio"], calls["ar"] / calls["pd"], rel_tol=1e-9)
    assert f"{calls['ar'] / calls['pd']:.2f}x" in printed and f"{lat['ar'] / lat['pd']:.2f}x" in printed


def _write(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def test_compare_table_against_hand_numbers(tmp_path, capsys):
    def rec(instruction, latency, calls, gen, mode):
        return {"instruction": instruction, "output": "x", "generator": gen, "dataset": "d", "mode": mode,
                "latency_s": latency, "model_calls": calls, "tokens": 10, "batch_fill": 1}

    ar = _write(tmp_path / "ar.json", [rec("a", 2.0, 10, "AR", "ar"), rec("b", 4.0, 30, "AR", "ar"),
                                       rec("only in ar", 100.0, 999, "AR", "ar")])
    pd = _write(tmp_path / "pd.json", [rec("b", 1.0, 5, "PD", "pd"), rec("a", 1.0, 5, "PD", "pd")])
    ref = _write(tmp_path / "gpt4.json", [{"instruction": "a", "output": "y", "generator": "gpt4"}])
    ann = [{"instruction": i, "output_1": "r", "generator_1": "gpt4", "output_2": "o", "generator_2": "PD",
            "annotator": "weighted_alpaca_eval_gpt4_turbo", "preference": p}
           for i, p in zip("abcdef", [2.0, 1.0, 1.5, 1.8, None, 0])]
    ann += [{"instruction": i, "generator_2": "AR", "preference": p} for i, p in (("a", 2.0), ("b", 1.0))]
    # PD judged against AR too: its own row, never pooled with the judgements against gpt4
    ann += [{"instruction": i, "output_1": "r", "generator_1": "AR", "output_2": "o", "generator_2": "PD",
             "preference": p} for i, p in (("a", 1.0), ("b", 1.0), ("c", 2.0))]
    annotations = _write(tmp_path / "annotations.json", ann)
    argv = ["compare", ar, pd, ref, "--annotations", annotations, annotations, "--json", str(tmp_path / "t.json")]
    assert main(argv) == 0  # the same file twice: every judgement counts once
    out = capsys.readouterr()
    printed = out.out
    assert "warning: 11 duplicate annotations" in out.err
    # paired on a, b: AR latency mean 3, calls mean 20; PD 1 and 5 -> 3.00x and 4.00x
    assert "3.00x" in printed and "4.00x" in printed
    # PD vs gpt4: preferences 2, 1, 1.5, 1.8, (None dropped), 0 -> 1.5: mean of 1, 0, .5, .8, .5 = 0.56
    p = np.array([1.0, 0.0, 0.5, 0.8, 0.5])
    se = p.std(ddof=1) / np.sqrt(5) * 100
    vs_ar = np.array([0.0, 0.0, 1.0])
    se_ar = vs_ar.std(ddof=1) / np.sqrt(3) * 100
    assert f"56.0 ± {se:.1f}" in printed and "50.0 ± 50.0" in printed and f"33.3 ± {se_ar:.1f}" in printed
    rows = json.load(open(tmp_path / "t.json"))["rows"]
    by_pair = {(r["generator"], r["judged_against"]): r for r in rows}
    assert sorted(by_pair, key=str) == sorted([("AR", None), ("PD", "AR"), ("PD", "gpt4"), ("gpt4", None)], key=str)
    assert by_pair[("PD", "gpt4")]["win"]["n_wins"] == 2 and by_pair[("PD", "gpt4")]["win"]["n_draws"] == 2
    assert by_pair[("PD", "gpt4")]["win"]["n_total"] == 5 and by_pair[("PD", "AR")]["win"]["n_total"] == 3
    assert by_pair[("PD", "AR")]["speedup"] == by_pair[("PD", "gpt4")]["speedup"] == 3.0
    assert by_pair[("gpt4", None)]["speedup"] is None and by_pair[("AR", None)]["speedup"] == 1.0

    # judgements of a model whose outputs are not compared: one line, exit 2, naming what was found
    stray = _write(tmp_path / "stray.json", [{"instruction": "a", "generator_1": "AR", "generator_2": "PD-other",
                                              "preference": 2.0}])
    assert main(["compare", ar, pd, "--annotations", stray]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PD-other" in err and "'AR', 'PD'" in err


def test_outputs_of_earlier_versions_still_read(tmp_path, capsys):
    """Files written with id lists as JSON lists (which alpaca_eval rejects) read as before; new files as strings."""
    from pdjax.eval import write_outputs

    rec = {"instruction": "a", "output": "x", "generator": "PD", "dataset": "d", "mode": "pd", "latency_s": 1.0,
           "model_calls": 5, "tokens": 3, "batch_fill": 1, "token_ids": [4, 5, 6], "span_lengths": [2]}
    old = _write(tmp_path / "old.json", [rec])
    new = str(tmp_path / "new.json")
    write_outputs(new, [rec])
    assert json.load(open(new))[0]["token_ids"] == "4 5 6" and json.load(open(new))[0]["span_lengths"] == "2"
    assert read_outputs(old) == read_outputs(new) == [rec]
    assert main(["compare", old, new]) == 0


def test_win_rate_matches_alpaca_eval_rules():
    w = win_rate([2.0, 2.0, 1.0, 1.5, float("nan"), 7, "x"])
    assert (w.n_total, w.n_wins, w.n_losses, w.n_draws) == (4, 2, 1, 1)
    assert math.isclose(w.win_rate, 62.5)
    assert win_rate([None]) is None


def test_prompts_from_json_list_and_errors(tmp_path):
    path = _write(tmp_path / "p.json", [{"instruction": "a", "dataset": "koala"}, "b", {"prompt": "c"}])
    got = load_prompts(path, num_samples=2)
    assert [(p.index, p.instruction, p.dataset) for p in got] == [(0, "a", "koala"), (1, "b", "p")]
    bad = _write(tmp_path / "bad.json", [{"text": "a"}])
    assert main(["generate", "--prompts", bad, "--output", str(tmp_path / "o.json")]) == 2


def test_every_decode_option_has_a_flag():
    from pdjax.decode.dream import DreamOptions
    from pdjax.eval.cli import DREAM_OPTION_FLAGS

    fields = set(DecodeOptions.__dataclass_fields__)
    assert set(OPTION_FLAGS) == fields
    assert set(DreamOptions.__dataclass_fields__) - {"eps"} <= set(OPTION_FLAGS) | set(DREAM_OPTION_FLAGS)
    dream = options_from_args(build_parser().parse_args(["generate", "--output", "o.json", "--mode", "dream", "--alg",
                                                   "origin", "--alg_temp", "0.5", "--steps_ratio", "0.5"]))
    assert (type(dream).__name__, dream.alg, dream.alg_temp, dream.steps_ratio) == ("DreamOptions", "origin", 0.5, 0.5)
    argv = ["generate", "--output", "o.json", "--steps_ratio", "0.5", "--confidence_threshold", "0.7",
            "--length_scale", "8", "--alg", "topk_margin", "--temperature", "0.7", "--top_p", "0.9", "--top_k", "5",
            "--disable_block_sparsity", "--seed", "3", "--max_new_tokens", "64"]
    assert options_from_args(build_parser().parse_args(argv)) == DecodeOptions(
        steps_ratio=0.5, confidence_threshold=0.7, length_scale=8.0, alg="topk_margin", temperature=0.7, top_p=0.9,
        top_k=5, dense=True, seed=3, max_new_tokens=64)


def test_diffusion_refuses_prompts_with_no_room_for_its_masks(pd_model, prompts, files):
    from pdjax.decode import DecodeInputError
    from pdjax.eval import EvalModel

    diffusion = EvalModel(pd_model.model, pd_model.tokenizer, DecodeConfig(mode="diffusion", max_length=MAX_LENGTH),
                          system_prompt="")
    longest = max(len(diffusion.encode(p.instruction)) for p in prompts)
    options = DecodeOptions(temperature=0.0, max_new_tokens=MAX_LENGTH - longest + 1)
    with pytest.raises(DecodeInputError, match=f"max_length >= {MAX_LENGTH + 1}"):
        generate_outputs(diffusion, prompts, str(files / "diffusion.json"), options=options)
    assert not any(f.endswith(".jsonl") for f in os.listdir(files / "diffusion.json.parts"))


def _score(output: str) -> int:
    import hashlib

    return 1 + int(hashlib.sha256(output.encode()).hexdigest()[:8], 16)


def _judge_logprobs(prompt: str) -> dict[str, float]:
    """The fake judge: log-probabilities of the identifiers "m" (output_1) and "M" (output_2) in alpaca_eval's
    weighted GPT-4-turbo prompt. Each output scores a number from its SHA-256; P(m) = score_m / (score_m + score_M),
    so the verdict is deterministic, fractional, and independent of the order alpaca_eval randomises."""
    import re

    outputs = dict(re.findall(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', prompt, re.S))
    score = {k: _score(v) for k, v in outputs.items()}
    total = score["m"] + score["M"]
    return {k: math.log(v / total) for k, v in score.items()}


@pytest.fixture
def fake_openai_judge():
    """An OpenAI-compatible chat-completions server on 127.0.0.1 answering with `_preferred` (stopped after)."""
    import http.server
    import threading

    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = "\n".join(str(m["content"]) for m in body["messages"])
            calls.append(prompt)
            lp = _judge_logprobs(prompt)
            top = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in sorted(lp.items(), key=lambda x: -x[1])]
            answer = {"id": f"fake-{len(calls)}", "object": "chat.completion", "created": 0, "model": body["model"],
                      "choices": [{"index": 0, "finish_reason": "length",
                                   "message": {"role": "assistant", "content": top[0]["token"]},
                                   "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}],
                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_alpaca_eval_judges_our_outputs_and_compare_agrees(pd_model, prompts, pd_outputs, files, fake_openai_judge):
    """alpaca_eval's real `evaluate` on pdjax outputs files, its judge a local OpenAI-compatible fake (no network)."""
    pytest.importorskip("alpaca_eval")
    import alpaca_eval
    import yaml
    from alpaca_eval import constants
    from alpaca_eval.metrics import pairwise_to_winrate

    base_url, calls = fake_openai_judge
    ref_out = str(files / "pd_sampled.json")  # a second generator on the same prompts (no recompilation)
    generate_outputs(pd_model, prompts, ref_out, options=DecodeOptions(temperature=1.0, top_p=None, seed=7),
                     generator="tiny-pd-sampled")
    judge_dir = files / "fake_judge"
    judge_dir.mkdir()
    clients = judge_dir / "clients.yaml"  # alpaca_eval's client config: the fake server, bounded waits
    clients.write_text(yaml.safe_dump({"default": [{"api_key": "fake", "base_url": base_url, "timeout": 30,
                                                    "max_retries": 0}]}))
    # AlpacaEval 2's default judge, weighted_alpaca_eval_gpt4_turbo, as shipped, its client pointed at the fake
    shipped = constants.EVALUATORS_CONFIG_DIR / "weighted_alpaca_eval_gpt4_turbo"
    config = yaml.safe_load((shipped / "configs.yaml").read_text())["weighted_alpaca_eval_gpt4_turbo"]
    config["prompt_template"] = str(constants.EVALUATORS_CONFIG_DIR / config["prompt_template"])
    config["completions_kwargs"].update(client_config_path=str(clients), num_procs=1, n_retries=1)
    (judge_dir / "configs.yaml").write_text(yaml.safe_dump({"weighted_alpaca_eval_gpt4_turbo": config}))
    results = files / "alpaca_eval_results"
    leaderboard, _ = alpaca_eval.evaluate(
        model_outputs=pd_outputs, reference_outputs=ref_out, annotators_config=str(judge_dir / "configs.yaml"),
        output_path=str(results), precomputed_leaderboard=None, fn_metric="get_winrate", sort_by="win_rate",
        is_return_instead_of_print=True, caching_path=None,
    )
    annotations = json.load(open(results / "annotations.json"))
    assert len(annotations) == 3 and len(calls) == sum(a["output_1"] != a["output_2"] for a in annotations) > 0
    assert {a["annotator"] for a in annotations} == {"weighted_alpaca_eval_gpt4_turbo"}
    assert {(a["generator_1"], a["generator_2"]) for a in annotations} == {("tiny-pd-sampled", "tiny-pd")}
    judged = [a for a in annotations if a["output_1"] != a["output_2"]]
    for a in judged:  # alpaca_eval read the fake judge's verdicts: preference = 1 + P(output_2 is better)
        s1, s2 = _score(a["output_1"]), _score(a["output_2"])
        assert math.isclose(a["preference"], 1 + s2 / (s1 + s2), rel_tol=1e-6)
    expected = pairwise_to_winrate([a["preference"] for a in annotations])
    assert math.isclose(leaderboard.loc["tiny-pd", "win_rate"], expected["win_rate"])

    table = str(files / "judged.json")
    argv = ["compare", pd_outputs, ref_out, "--annotations", str(results / "annotations.json"), "--json", table]
    assert main(argv) == 0
    (row,) = [r for r in json.load(open(table))["rows"] if r["win"] is not None]
    assert (row["generator"], row["judged_against"]) == ("tiny-pd", "tiny-pd-sampled")
    assert math.isclose(row["win"]["win_rate"], expected["win_rate"], abs_tol=1e-9)
    assert row["win"]["n_total"] == expected["n_total"] == 3
    assert (row["win"]["n_wins"], row["win"]["n_draws"]) == (expected["n_wins"], expected["n_draws"])
    assert math.isclose(row["win"]["standard_error"], expected["standard_error"], rel_tol=1e-9)


def test_cli_diffusion_decodes_the_models_own_mask_count(tmp_path):
    """Without --max_new_tokens, mode diffusion decodes the model's generation_config.json max_new_tokens masks
    (as `python -m pdjax.decode` does), not the rest of --max_length; the flag still overrides it."""
    from pdjax.decode.model_info import read_model_info
    from pdjax.eval.runner import default_model_path

    masks = read_model_info(default_model_path("diffusion")).diffusion_masks
    prompts = _write(tmp_path / "p.json", ["Which word is longer, tiger or bird?"])
    for flags, want in (([], masks), (["--max_new_tokens", "24"], 24)):
        out = str(tmp_path / f"d{len(flags)}.json")
        argv = ["generate", "--mode", "diffusion", "--prompts", prompts, "--output", out, "--max_length", "192",
                "--temperature", "0", *flags]
        assert main(argv) == 0
        (row,) = read_outputs(out)
        assert row["denoise_calls"] == want  # steps_ratio 1: one denoising step per mask
    assert 0 < masks < 192 - 30


@pytest.mark.parametrize("flag, value, says", [
    ("--num_samples", "-1", ">= 1"), ("--stop_after", "0", ">= 1"), ("--batch_size", "0", ">= 1"),
    ("--max_spans", "0", ">= 1"), ("--max_length", "1", ">= 2"), ("--max_new_tokens", "0", ">= 1"),
    ("--top_k", "-1", ">= 0"), ("--seed", "-3", ">= 0"), ("--num_shards", "0", ">= 1"),
    ("--shard_index", "-1", ">= 0"), ("--devices", "0", ">= 1"), ("--buckets", "0,64", ">= 1"),
    ("--batch_size", "two", "expected an integer"),
])
def test_generate_flags_out_of_range_are_one_line_errors(flag, value, says, capsys):
    """Each numeric flag of `generate` is checked by argparse: exit 2, one line naming the flag, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--output", "o.json", flag, value])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and says in last


def test_generate_more_devices_than_the_host_has_is_a_one_line_error(tmp_path, capsys):
    prompts = _write(tmp_path / "p.json", ["Hello?"])
    assert main(["generate", "--output", str(tmp_path / "o.json"), "--prompts", prompts,
                 "--devices", str(len(jax.local_devices()) + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "local device" in err
    assert not os.path.exists(tmp_path / "o.json")
