"""Every command answers a bad file, flag or model folder with one line naming it, exit status 2, no traceback.

``--debug`` or ``PDJAX_DEBUG=1`` lets the traceback through. Model folders:
a truncated or corrupt model.safetensors, an orbax training checkpoint, a
missing or broken config.json. Eval inputs: prompts, outputs and annotations
files with a broken line, a wrong-typed field, a .json holding one object.
No test here compiles a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pdjax.cli_errors import UserError, run_main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "pdjax" / "assets" / "default_model" / "pd"


STATUS = ("loading ", "compiling ", "decoding ", "drawing ", "training the BPE ", "writing ")  # progress lines on stderr


def one_line_error(err: str, prog: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if not line.startswith(STATUS)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- the shared wrapper --------------------------------------------------------------------


def _fails(argv):
    raise UserError(f"bad thing in {argv}")


def test_run_main_prints_one_line_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("PDJAX_DEBUG", raising=False)
    assert run_main(_fails, ["x"], prog="tool") == 2
    one_line_error(capsys.readouterr().err, "tool", "bad thing in ['x']")

    def missing(argv):
        open("/nonexistent/file.jsonl")

    assert run_main(missing, [], prog="tool") == 2
    one_line_error(capsys.readouterr().err, "tool", "/nonexistent/file.jsonl: No such file or directory")
    assert run_main(lambda argv: None, []) == 0 and run_main(lambda argv: 3, []) == 3


def test_debug_flag_or_env_shows_the_traceback(monkeypatch):
    seen = []
    with pytest.raises(UserError):
        run_main(lambda argv: seen.append(argv) or _fails(argv), ["a", "--debug", "b"])
    assert seen == [["a", "b"]]  # --debug is taken off the command line
    monkeypatch.setenv("PDJAX_DEBUG", "1")
    with pytest.raises(UserError):
        run_main(_fails, [])
    monkeypatch.setenv("PDJAX_DEBUG", "0")
    assert run_main(_fails, []) == 2


def test_ctrl_c_is_one_line_and_130(capsys, monkeypatch):
    monkeypatch.delenv("PDJAX_DEBUG", raising=False)

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_main(interrupted, [], prog="tool") == 130
    assert capsys.readouterr().err == "tool: interrupted\n"


def test_other_exceptions_are_not_hidden():
    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(bug, [])


# ---- model folders ---------------------------------------------------------------------------


def model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_decode_names_a_truncated_or_corrupt_safetensors_file(tmp_path, capsys, damage):
    from pdjax.decode.cli import main

    folder = model_copy(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 8)
    assert main(["--model", str(folder), "--prompt", "hi"]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.decode", f"{weights}: truncated or corrupt safetensors file")


def test_an_orbax_checkpoint_says_so_and_how_to_export_it(tmp_path, capsys):
    import numpy as np
    import orbax.checkpoint as ocp

    root = tmp_path / "ckpt"
    manager = ocp.CheckpointManager(root, item_names=("state", "meta"))
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)}), meta=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()
    from pdjax.decode.cli import main

    for given, step in ((root, None), (root / "7", "7"), (root / "7" / "state", "7")):
        assert main(["--model", str(given), "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        one_line_error(err, "pdjax.decode", f"{given} is an orbax training checkpoint",
                       f"python -m pdjax.train --config CONFIG checkpoint.dir={root} --export DIR")  # fmt: skip
        assert ("--step 7" in err) == (step is not None)
    from pdjax.eval.cli import main as eval_main

    assert eval_main(["generate", "--model", str(root), "--output", str(tmp_path / "o.json")]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.eval", f"{root} is an orbax training checkpoint")


def test_model_folder_without_or_with_a_broken_config(tmp_path):
    from pdjax.model import load_pretrained
    from pdjax.model.checkpoint import CheckpointError

    folder = model_copy(tmp_path)
    (folder / "config.json").write_text('{"hidden_size": 8,\n  oops}')
    with pytest.raises(CheckpointError, match=r"config.json: not a JSON file \(line 2, column 3\)"):
        load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(folder)
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_pretrained(tmp_path / "nothing")


def test_memory_with_a_bad_model(tmp_path, capsys):
    from pdjax.memory import main

    assert main(["--model", str(tmp_path / "nope")]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.memory", "neither a preset")
    (tmp_path / "config.json").write_text("not json")
    assert main(["--model", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.memory", "cannot read its config.json")


def test_launch_with_an_unknown_accelerator_is_exit_2():
    run = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "tpu.py"), "create", "--name", "x", "--zone", "z", "--dry-run",
         "--accelerator", "v9x-8"], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    # argparse's own form: the usage, then one line with the reason
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("launch/tpu.py create: error: argument --accelerator: unknown accelerator type 'v9x-8'")


# ---- eval input files ------------------------------------------------------------------------


def eval_main(argv, capsys) -> str:
    from pdjax.eval.cli import main

    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"instruction": "a"}\n\n{"instruction": "b"\n', "p.jsonl:3: not JSON"),
        ("p.jsonl", '{"instruction": "a"}\n{"instruction": 5}\n', "p.jsonl:2: field 'instruction' is an int, not a string"),
        ("p.jsonl", '{"instruction": "a"}\n{"text": "b"}\n', "p.jsonl:2: none of the fields ('instruction', 'prompt')"),
        ("p.json", '{"instruction": "a"}', "p.json:1: a .json file must hold a list of records, not an object"),
        ("p.json", '[{"instruction": "a"},\n {"instruction": }]', "p.json:2: not JSON"),
        ("p.json", '[{"instruction": "a"}, 3]', "p.json item 2: a prompt row is an int"),
        ("p.jsonl", b'{"instruction": "\xff"}\n', "p.jsonl:1: not UTF-8"),
    ],
)
def test_eval_prompts_file_errors_name_file_and_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = eval_main(["generate", "--prompts", str(path), "--output", str(tmp_path / "o.json")], capsys)
    one_line_error(err, "pdjax.eval", str(tmp_path / message))


def test_eval_prompts_missing_file(tmp_path, capsys):
    err = eval_main(["generate", "--prompts", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.json")], capsys)
    one_line_error(err, "pdjax.eval", "none.jsonl: no such file")


def test_eval_compare_outputs_and_annotations_errors(tmp_path, capsys):
    good = [{"instruction": "a", "output": "b", "generator": "g"}]
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "b.jsonl").write_text(json.dumps(good[0]) + "\n" + '{"instruction": "a", "output": \n')
    err = eval_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")], capsys)
    one_line_error(err, "pdjax.eval", f"{tmp_path / 'b.jsonl'}:2: not JSON")
    (tmp_path / "b.jsonl").write_text(json.dumps(good[0]) + "\n" + '{"instruction": "a"}\n')
    err = eval_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")], capsys)
    one_line_error(err, "pdjax.eval", f"{tmp_path / 'b.jsonl'}:2: not an outputs record")
    (tmp_path / "ann.json").write_text('[{"generator_2": "g", "preference": 1},\n\n {oops}]')
    err = eval_main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--annotations",
                     str(tmp_path / "ann.json")], capsys)  # fmt: skip
    one_line_error(err, "pdjax.eval", f"{tmp_path / 'ann.json'}:3: not JSON")


# ---- train and synthetic ---------------------------------------------------------------------


def test_train_bad_config_file_is_one_line(tmp_path, capsys):
    from pdjax.train.cli import main

    (tmp_path / "c.yaml").write_text("steps: [1, 2\n")
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.train", f"{tmp_path / 'c.yaml'}: not valid YAML (expected ',' or ']'")
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.train", "none.yaml")
    (tmp_path / "good.yaml").write_text("steps: 3\n")
    assert main(["--config", str(tmp_path / "good.yaml"), "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main([f"model.tokenizer={tmp_path / 'tok'}", f"data.source={tmp_path / 'rows.jsonl'}", "steps=1"]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.train", f"{tmp_path / 'tok'}: no such tokenizer folder")


def test_synthetic_out_under_a_file_is_one_line(tmp_path, capsys):
    from pdjax.synthetic.__main__ import main

    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file" / "sub"), "--num_train", "2", "--num_heldout", "1"]) == 2
    one_line_error(capsys.readouterr().err, "pdjax.synthetic", str(tmp_path / "file"))


def test_debug_env_in_a_subprocess_shows_the_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PDJAX_DEBUG="1")
    run = subprocess.run([sys.executable, "-m", "pdjax.memory", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert run.returncode == 1 and "Traceback" in run.stderr and "UserError" in run.stderr
