"""The persistent XLA compilation cache of pdjax's CLIs (pdjax/compile_cache.py).

Each check runs in a fresh process: JAX reads its cache settings once, at the first
compilation of a process, and the settings are process-global. Cache hits are counted
with JAX's own monitoring events, so nothing here depends on timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED_PD = REPO / "pdjax" / "assets" / "default_model" / "pd"

# Decode once with the CLI and report its exit code and JAX's cache events (hits / misses of the persistent cache).
DECODE = """
import json, sys
from jax import monitoring
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
from pdjax.decode.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}), file=sys.stderr)
"""
ARGS = ["--model", str(SHIPPED_PD), "--prompt", "Spell the word cat backwards.", "--temperature", "0",
        "--max_length", "64", "--buckets", "64", "--json"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "PDJAX_COMPILATION_CACHE")}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu"})
    env.update(extra)
    return env


def _decode(env: dict[str, str], *flags: str) -> dict:
    done = subprocess.run([sys.executable, "-c", DECODE, *ARGS, *flags], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0
    stats = json.loads(done.stdout.strip().splitlines()[-1])["stats"]
    return {**report, "compile_time_s": stats["compile_time_s"]}


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_second_identical_decode_reads_the_program_from_the_cache(tmp_path):
    env = _env(tmp_path)
    cache = tmp_path / "xdg" / "pdjax" / "xla"  # $XDG_CACHE_HOME/pdjax/xla
    first = _decode(env)
    assert first["hits"] == 0 and first["misses"] >= 1
    written = _entries(cache)
    assert any(name.startswith("jit_run-") for name in written), written  # the decoder's program
    second = _decode(env)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert _entries(cache) == written  # nothing new compiled


def test_the_environment_variable_turns_the_cache_off(tmp_path):
    report = _decode(_env(tmp_path, PDJAX_COMPILATION_CACHE="0"))
    assert report["hits"] == report["misses"] == 0
    assert _entries(tmp_path / "xdg" / "pdjax" / "xla") == []


@pytest.mark.parametrize("module", ["pdjax.decode.cli", "pdjax.train.cli", "pdjax.eval.cli"])
def test_every_cli_has_the_flag_and_passes_it_on(module, monkeypatch):
    """`--no_compilation_cache` reaches `compile_cache.enable(disabled=True)` before any work (stopped by a stub)."""
    import importlib

    from pdjax import compile_cache

    class Called(Exception):
        pass

    def fake_enable(disabled: bool = False):
        raise Called(disabled)

    monkeypatch.setattr(compile_cache, "enable", fake_enable)
    argv = {"pdjax.decode.cli": ["--prompt", "hi"], "pdjax.train.cli": ["--config", str(REPO / "configs" / "tiny_cpu.yaml")],
            "pdjax.eval.cli": ["generate", "--prompts", "x.jsonl", "--output", "y.json"]}[module]
    cli = importlib.import_module(module)
    if module == "pdjax.train.cli":
        monkeypatch.setattr("pdjax.train.trainer.initialize_distributed", lambda *a, **k: None)
    for flag, want in (([], False), (["--no_compilation_cache"], True)):
        with pytest.raises(Called) as got:
            cli.main([*argv, *flag] if module != "pdjax.eval.cli" else [argv[0], *flag, *argv[1:]])
        assert got.value.args == (want,)


def _call_enable(tmp_path: Path, code: str, **extra: str) -> subprocess.CompletedProcess:
    script = "import jax\nfrom pdjax import compile_cache\n" + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path, **extra))


def test_default_folder_follows_xdg_cache_home(tmp_path):
    done = _call_enable(tmp_path, "print(compile_cache.enable()); print(jax.config.jax_compilation_cache_dir)")
    want = str(tmp_path / "xdg" / "pdjax" / "xla")
    assert done.stdout.split() == [want, want], done.stderr
    home = _call_enable(tmp_path, "print(compile_cache.default_dir())", XDG_CACHE_HOME="", HOME=str(tmp_path / "h"))
    assert home.stdout.strip() == str(tmp_path / "h" / ".cache" / "pdjax" / "xla")


def test_a_user_set_jax_cache_dir_wins(tmp_path):
    mine = tmp_path / "mine"
    done = _call_enable(tmp_path, "print(compile_cache.enable())", JAX_COMPILATION_CACHE_DIR=str(mine))
    assert done.stdout.strip() == str(mine) and mine.is_dir()


def test_an_unwritable_folder_warns_and_runs_without_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = _call_enable(tmp_path, "print(compile_cache.enable())", XDG_CACHE_HOME=str(blocker))
    assert done.returncode == 0 and done.stdout.strip() == "None"
    assert done.stderr.startswith("warning: compilation cache off: cannot create") and "Traceback" not in done.stderr
