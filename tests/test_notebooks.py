"""The notebooks run top to bottom on CPU with tiny parameters, in a kernel of this interpreter.

Parameters are injected papermill-style: a cell tagged ``injected-parameters``
right after the cell tagged ``parameters``. A probe cell appended at the end
reports the kernel's interpreter, whether torch was imported, and the values
the assertions need. pdjax is importable here, so the install cell must be a
no-op (the kernel also runs with ``PIP_NO_INDEX`` so that a pip call could not
download anything).
"""

from __future__ import annotations

import ast
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_MODEL = ROOT / "pdjax" / "assets" / "default_model"
PROBE = "NOTEBOOK-PROBE "
TINY_MODEL = "{hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16}"


def inject(nb: Any, params: dict[str, Any]) -> None:
    """Insert papermill's ``injected-parameters`` cell after the ``parameters`` cell."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def kernel_env() -> dict[str, str]:
    """This process's environment for the kernel, on one CPU device as a user's runtime would be."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["HF_HUB_OFFLINE"] = "1"
    env["PIP_NO_INDEX"] = "1"
    return env


def cell_text(cell: Any) -> str:
    """Everything a code cell printed or displayed, as plain text (rich's colour codes removed)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.data.get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(parts))


def execute(name: str, params: dict[str, Any], probe: str, cwd: Path) -> tuple[Any, dict[str, Any]]:
    """Run notebooks/<name> with `params` injected in `cwd`; return it and the probe's JSON (`probe`: extra fields)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    inject(nb, params)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json as _json, sys as _sys\n"
            f"print({PROBE!r} + _json.dumps({{'torch': 'torch' in _sys.modules, 'executable': _sys.executable, {probe}}}))"
        )
    )
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env())
    line = next(l for l in cell_text(nb.cells[-1]).splitlines() if l.startswith(PROBE))
    return nb, json.loads(line[len(PROBE) :])


def outputs(nb: Any) -> str:
    return "\n".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def install_cell(nb: Any) -> Any:
    """The cell that installs pdjax (its pip call is checked against constraints.txt in tests/test_constraints.py)."""
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# Installs pdjax"))


def assignments(source: str) -> dict[str, Any]:
    """The literal values assigned at the top level of a Python source (read, not executed)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def test_kernel_is_this_interpreter() -> None:
    """``python3`` resolves to this interpreter (jupyter_client swaps a bare ``python`` for sys.executable)."""
    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert argv0 in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable)


# ---- static checks: no kernel needed ----------------------------------------------------------


@pytest.mark.parametrize("name", ["decode.ipynb", "finetune.ipynb"])
def test_notebook_is_clean_and_parameterised(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and code.index(params[0]) == 0, "the first code cell holds the parameters"
    names = {t.id for n in ast.parse(params[0].source).body for t in getattr(n, "targets", [])}
    assert {"PDJAX_SOURCE"} <= names
    for cell in code:
        tree = ast.parse(cell.source)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in imported
        assert "AutoTokenizer" not in cell.source, "AutoTokenizer imports torch whenever it is installed"


def test_finetune_config_is_tiny_cpu_yaml() -> None:
    """The configuration written out by finetune.ipynb is configs/tiny_cpu.yaml, value for value."""
    nb = nbformat.read(NOTEBOOKS / "finetune.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "TINY_CPU_YAML = " in c.source)
    embedded = yaml.safe_load(assignments(cell.source)["TINY_CPU_YAML"])
    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    # the notebook writes its data with pdjax.synthetic in a cell of its own; the config generates the same
    # folder on first use (a `synthetic:` source)
    folder = config["data"]["source"].removeprefix("synthetic:").split("?")[0]
    assert embedded["data"].pop("source") == f"{folder}/train.jsonl"
    config["data"].pop("source")
    assert embedded == config


# ---- the notebooks, run -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Path]:
    cwd = tmp_path_factory.mktemp("finetune")
    params = {
        "WORKDIR": "work",
        "NUM_TRAIN": 200,
        "NUM_HELDOUT": 10,
        "STEPS": 16,
        "OVERRIDES": [f"model.preset_args={TINY_MODEL}", "log.every_steps=2", "optimizer.warmup_steps=2"],
        "NUM_PROMPTS": 2,
        "MAX_LENGTH": 128,
        "BUCKETS": (64,),
    }
    nb, probe = execute("finetune.ipynb", params, "'export_dir': str(export_dir), 'logged': logged", cwd)
    return nb, probe, cwd


def shipped_defaults() -> bool:
    return all((DEFAULT_MODEL / kind / "config.json").is_file() for kind in ("pd", "ar"))


@pytest.fixture(scope="module")
def decode(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple[Any, dict[str, Any]]:
    params: dict[str, Any] = {"NUM_PROMPTS": 2, "MAX_LENGTH": 128, "BUCKETS": (64,)}
    if not shipped_defaults():  # a checkout without the shipped models: the fine-tuned export stands in for both
        _, probe, _ = request.getfixturevalue("finetune")
        params.update(PD_MODEL=probe["export_dir"], AR_MODEL=probe["export_dir"])
    stats = "'latency': {m: [s.to_dict() for s in v] for m, v in latency.items()}, 'prompts': prompts, 'sources': sources"
    return execute("decode.ipynb", params, stats, tmp_path_factory.mktemp("decode"))


def test_finetune_runs_without_pip_or_torch(finetune) -> None:
    nb, probe, _ = finetune
    assert "nothing to install" in cell_text(install_cell(nb))
    assert probe["executable"] == sys.executable
    assert not probe["torch"], "executing the notebook imported torch"


def test_finetune_loss_goes_down(finetune) -> None:
    nb, probe, cwd = finetune
    with open(cwd / "work" / "logs" / "metrics.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [1, *range(2, 17, 2)]
    losses = [r["loss"] for r in logged]
    assert statistics.fmean(losses[-3:]) < statistics.fmean(losses[:3]) - 0.5, losses
    assert f"-> {losses[-1]:.3f} at step 16" in outputs(nb)
    assert "training metrics (9 logged steps)" in outputs(nb)


def test_finetune_export_loads_and_decodes(finetune) -> None:
    from transformers import PreTrainedTokenizerFast

    from pdjax.model import count_params, load_pretrained
    from pdjax.structure import ControlIds

    nb, probe, cwd = finetune
    export = Path(probe["export_dir"])
    assert export == (cwd / "work" / "hf").resolve()
    model = load_pretrained(export)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 128, 2, 4, 2, 16)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(export)
    ControlIds.from_tokenizer(tokenizer)  # the plan language's tokens travelled with the export
    assert len(tokenizer) <= c.vocab_size
    assert count_params(model) == c.num_params
    text = outputs(nb)
    assert text.count("plan and spans") == 2 and text.count("expected: ") == 2
    assert "held-out check: {'answers': 2" in text


def notebook_function(name: str, function: str, namespace: dict[str, Any]) -> Any:
    """A function defined in a notebook's code cell, compiled on its own in `namespace`."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.FunctionDef) and node.name == function:
                exec(compile(ast.Module([node], []), f"{name}:{function}", "exec"), namespace)
                return namespace[function]
    raise LookupError(f"{name} defines no {function}()")


def test_decode_tokenizer_loader_reads_slow_tokenizer_folders(finetune, tmp_path: Path) -> None:
    """A folder saved by a slow (remote-code) Dream tokenizer: vocab.json + merges.txt, no tokenizer.json.

    The notebook reads it as Qwen2's BPE; it must tokenize, apply the chat template and find the control
    tokens exactly as the fast tokenizer of the same vocabulary does.
    """
    import shutil

    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    from pdjax.model.tokenizer import chat_prompt_ids, control_ids

    export = Path(finetune[1]["export_dir"])
    fast = PreTrainedTokenizerFast.from_pretrained(export)
    fast.backend_tokenizer.model.save(str(tmp_path))
    config = json.loads((export / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                 "normalized": t.normalized, "single_word": t.single_word}
        for i, t in fast.added_tokens_decoder.items()
    }
    config.update(tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copy(export / "chat_template.jinja", tmp_path)
    load_tokenizer = notebook_function("decode.ipynb", "load_tokenizer", {
        "os": os, "PreTrainedTokenizerFast": PreTrainedTokenizerFast, "Qwen2Tokenizer": Qwen2Tokenizer})
    slow = load_tokenizer(str(tmp_path))
    assert isinstance(slow, Qwen2Tokenizer) and not (tmp_path / "tokenizer.json").exists()
    text = "<promise>-<topic>apple price 1</topic><async>The apple costs 14 coins.</async><sync/> So [PAD]<|im_end|>"
    assert slow.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False)
    assert chat_prompt_ids(slow, "Which word is longer, cat or horse?") == chat_prompt_ids(fast, "Which word is longer, cat or horse?")
    assert control_ids(slow) == control_ids(fast)
    assert type(load_tokenizer(str(export))) is type(fast)


def test_decode_runs_without_pip_or_torch(decode) -> None:
    nb, probe = decode
    assert "nothing to install" in cell_text(install_cell(nb))
    assert probe["executable"] == sys.executable
    assert not probe["torch"], "executing the notebook imported torch"


def test_decode_prints_plan_view_and_memory(decode) -> None:
    nb, probe = decode
    text = outputs(nb)
    assert "serving (per device)" in text and "KV cache" in text
    assert text.count("plan and spans") == len(probe["prompts"]) == 2
    for prompt in probe["prompts"]:
        assert prompt in text
    if shipped_defaults():
        with open(DEFAULT_MODEL / "pd" / "heldout.jsonl", encoding="utf-8") as f:
            assert probe["prompts"] == [json.loads(next(f))["prompt"] for _ in range(2)]


def test_decode_latency_table(decode) -> None:
    """A PD and an AR row whose numbers are the means of the decoder's per-request stats."""
    nb, probe = decode
    latency = probe["latency"]
    assert set(latency) == {"pd", "ar"} and all(len(v) == 2 for v in latency.values())
    for mode, stats in latency.items():
        for s in stats:
            assert s["batch_size"] == 1 and s["wall_time_s"] > 0
            assert s["model_calls"] == s["prefill_calls"] + s["plan_calls"] + s["denoise_calls"] + s["commit_calls"]
            if mode == "ar":  # one forward per token: the prefill gives the first, each plan step one more
                assert s["model_calls"] == s["tokens_generated"] and s["denoise_calls"] == 0
    text = outputs(nb)
    assert "PD vs AR on 2 prompts (batch 1, warm-up excluded)" in text
    for mode, stats in latency.items():
        row = next(l for l in text.splitlines() if re.match(rf"^\W*│\s*{mode.upper()}\s+│", l))
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", row)]
        calls = statistics.fmean(s["model_calls"] for s in stats)
        wall = statistics.fmean(s["wall_time_s"] for s in stats)
        tokens = statistics.fmean(s["tokens_generated"] for s in stats)
        assert numbers[-4:] == pytest.approx([round(calls, 1), round(tokens, 1), round(wall, 4), round(1000 * wall / calls, 3)], abs=1e-9)
