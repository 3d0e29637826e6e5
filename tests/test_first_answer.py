"""The README's first command prints a right answer that shows the method (issue 30).

Its prompt and flags are read from the README exactly as `.ci/run` reads the command (the first bash
block), decoded by `pdjax.decode`'s own CLI with the shipped PD model and, with `--mode ar` added, the
shipped AR model, and scored by the data's checker (`pdjax.synthetic.check_completion`, with the facts
of the shipped held-out file): every fact right, a plan of at least two spans, and fewer model calls
than AR's greedy answer to the same prompt. The line under the command states both models' held-out
fact accuracy, as their model cards give it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from pdjax.decode.cli import build_parser, main
from pdjax.model.tokenizer import load_tokenizer
from pdjax.structure import ControlIds, parse_response
from pdjax.synthetic import check_completion

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "pdjax" / "assets" / "default_model"


def first_bash_block(readme: str) -> list[str]:
    """The lines of the first ```bash block, as `.ci/run`'s awk reads them (fences must be whole lines)."""
    lines, inside = [], False
    for line in readme.splitlines():
        if line == "```bash":
            inside = True
            continue
        if line == "```":
            if inside:
                break
            continue
        if inside:
            lines.append(line)
    return lines


def decode_argv(block: list[str]) -> list[str]:
    """The arguments of the block's `python -m pdjax.decode` command (up to `&&`, `;` or the end)."""
    words = shlex.split(" ".join(block), posix=True)
    for i in range(len(words) - 2):
        if words[i : i + 3] == ["python", "-m", "pdjax.decode"]:
            rest = words[i + 3 :]
            end = next((j for j, w in enumerate(rest) if w in ("&&", ";", "||", "|")), len(rest))
            return rest[:end]
    raise AssertionError(f"the README's first bash block runs no `python -m pdjax.decode`: {block}")


def card_facts(kind: str) -> str:
    """The held-out fact accuracy a shipped model's card gives itself (e.g. "41.2 %")."""
    card = (ASSETS / kind / "README.md").read_text(encoding="utf-8")
    row = re.search(rf"^\| \*\*{kind}\*\* \(this model\) \| (\d+) \| ([\d.]+ %) \|", card, re.M)
    assert row, f"the {kind} model card has no held-out figures row"
    assert int(row.group(1)) >= 500, "the card's figures are measured on fewer than 500 held-out prompts"
    return row.group(2)


def test_first_bash_block_is_read_like_ci():
    text = "intro\n```python\nx = 1\n```\n```bash\necho a && \\\n  echo 'b c'\n```\n```bash\necho later\n```\n"
    assert first_bash_block(text) == ["echo a && \\", "  echo 'b c'"]
    assert decode_argv(['pip install -q -e . && python -m pdjax.decode --prompt "a b" --temperature 0']) == [
        "--prompt", "a b", "--temperature", "0"]
    assert decode_argv(["python -m pdjax.decode --prompt x && echo done"]) == ["--prompt", "x"]


@pytest.fixture(scope="module")
def readme_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = first_bash_block(readme)
    argv = decode_argv(block)
    args = build_parser().parse_args(argv)
    after = readme.split("\n".join(block), 1)[1].split("```", 1)[1]  # the text after the block's closing fence
    return argv, args, after


def run_cli(argv: list[str], capsys) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return record


def test_readme_first_answer_is_right_planned_and_cheaper_than_ar(readme_command, capsys):
    argv, args, _ = readme_command
    # the shipped PD model, greedy: what a newcomer gets is the model's best answer, not a lucky sample
    assert args.mode == "pd" and args.model is None and args.temperature == 0
    assert len(args.prompt) == 1 and not args.prompt_file
    (prompt,) = args.prompt
    rows = [json.loads(line) for line in (ASSETS / "pd" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    row = next((r for r in rows if r["prompt"] == prompt), None)
    assert row is not None, f"the README's prompt is not a held-out prompt of the shipped data: {prompt!r}"
    tokenizer = load_tokenizer(ASSETS / "pd")
    ids = ControlIds.from_tokenizer(tokenizer)

    pd = run_cli(argv, capsys)
    check = check_completion(row["facts"], pd["token_ids"], tokenizer)
    assert check.well_formed and check.planned
    assert check.facts >= 2 and check.facts_right == check.facts, (check, pd["text"])
    assert pd["stats"]["spans"] == len(parse_response(pd["token_ids"], ids).spans) >= 2
    assert pd["finish_reason"] == "eos"

    ar = run_cli([*argv, "--mode", "ar"], capsys)  # the same prompt and flags, the shipped AR model
    assert ar["mode"] == "ar" and ar["stats"]["spans"] == 0
    print(f"\nPD {pd['stats']['model_calls']} calls, AR {ar['stats']['model_calls']} calls: {pd['text']!r}")
    assert pd["stats"]["model_calls"] < ar["stats"]["model_calls"]


def test_line_under_the_command_gives_both_models_heldout_accuracy(readme_command):
    _, _, after = readme_command
    line = next(line for line in after.splitlines() if line.strip())
    pd, ar = card_facts("pd"), card_facts("ar")
    assert pd in line and ar in line and "PD" in line and "AR" in line, (line, pd, ar)
