"""The documentation holds: every relative link in README.md and docs/*.md resolves (files, and #anchors to a
heading of the target page), and every `python -m pdjax...` command shown in their code blocks names a module
that exists and whose argparse parser accepts the flags shown (parsed, not run).

Elision rule: a shown command any of whose arguments contains `...` (or `…`) stands for many commands and is not
parsed; nothing else is skipped. Placeholders such as gs://BUCKET or DIR are values like any other.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(```|~~~)")
LINK = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
COMMAND = re.compile(r"\bpython3?\s+-m\s+(pdjax(?:\.\w+)*)\b")
SHELL_STOPS = {"&&", "||", "|", ";", "&", ">", ">>", "2>", "2>&1", "<"}
ELIDED = ("...", "…")


def split_page(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code-block lines) of a markdown page."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and fence is None:
            fence = m.group(2)
        elif m and line.strip() == fence:
            fence = None
        elif fence is not None:
            code.append(line)
        else:
            prose.append(line)
    assert fence is None, "unclosed code block"
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.strip().lower().replace("`", "")
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown page, code blocks excluded (a repeated heading gets -1, -2, ...)."""
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        if re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    """Link targets of a page's prose that are neither web addresses nor mail."""
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    prose = [re.sub(r"`[^`]*`", "``", line) for line in prose]  # `[a](b)` in inline code is no link
    targets = [m.group(1) for line in prose for m in LINK.finditer(line)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/tpu.md", "docs/evaluation.md", "docs/serving.md", "docs/performance.md",
            "docs/default_model.md", "docs/reliability.md", "docs/differences.md"} <= names
    assert len(relative_links(ROOT / "README.md")) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_slug_matches_githubs_rule():
    assert slug(" Serving throughput (`benchmarks/serve_load.py`, `benchmarks/serve_engine.py`)") == (
        "serving-throughput-benchmarksserve_loadpy-benchmarksserve_enginepy")
    assert slug(" Evaluation: AlpacaEval, judged with alpaca_eval") == "evaluation-alpacaeval-judged-with-alpaca_eval"
    assert slug(" The default models: quality and critical path") == "the-default-models-quality-and-critical-path"


def shown_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(module, argv) of every `python -m pdjax...` in a page's code blocks: backslash continuations joined,
    `# comments` dropped, the command ending at a shell operator (&&, |, ;, >, ...) or a closing backtick."""
    _, code = split_page(page.read_text(encoding="utf-8"))
    joined = re.sub(r"\\\n\s*", " ", "\n".join(code))
    found = []
    for line in joined.splitlines():
        for m in COMMAND.finditer(line):
            try:
                tokens = shlex.split(line[m.end():].split("`")[0], comments=True)  # `cmd` quoted in a block
            except ValueError as e:  # an unbalanced quote is a broken example too
                raise AssertionError(f"{page.name}: cannot split {line!r}: {e}") from None
            argv = []
            for token in tokens:
                if token in SHELL_STOPS or re.fullmatch(r"\d?>>?\S*", token):
                    break
                argv.append(token)
            found.append((m.group(1), argv))
    return found


def _defines_build_parser(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return False
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    return "build_parser" in names


def build_parser(module: str):
    """The ArgumentParser of `python -m module`: `build_parser()` of its package's `cli` module, of its
    `__main__`, or of the module itself (found without running any `__main__`)."""
    package = importlib.util.find_spec(module)
    assert package is not None, f"python -m {module}: no such module"
    runs = f"{module}.__main__" if package.submodule_search_locations else module
    assert importlib.util.find_spec(runs) is not None, f"python -m {module}: {module} has no __main__"
    candidates = [f"{module}.cli", runs] if package.submodule_search_locations else [module]
    for name in candidates:
        with contextlib.suppress(ModuleNotFoundError):
            if _defines_build_parser(name):
                return importlib.import_module(name).build_parser()
    raise AssertionError(f"python -m {module}: none of {candidates} has build_parser()")


COMMANDS = [(page, module, argv) for page in PAGES for module, argv in shown_commands(page)]


def test_commands_are_found():
    modules = {module for _, module, _ in COMMANDS}
    assert {"pdjax.decode", "pdjax.train", "pdjax.eval", "pdjax.serve", "pdjax.memory", "pdjax.synthetic"} <= modules
    readme = [argv for page, module, argv in COMMANDS if page.name == "README.md" and module == "pdjax.decode"]
    assert readme and readme[0][0] == "--prompt"


@pytest.mark.parametrize(("page", "module", "argv"), COMMANDS,
                         ids=[f"{p.relative_to(ROOT).as_posix()}:{m}:{i}" for i, (p, m, _) in enumerate(COMMANDS)])
def test_shown_command_parses(page, module, argv):
    if any(marker in token for token in argv for marker in ELIDED):
        pytest.skip(f"elided: python -m {module} {shlex.join(argv)}")
    parser = build_parser(module)
    err = io.StringIO()
    argv = [a for a in argv if a != "--debug"]  # cli_main takes it off the line before parsing, anywhere
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{page.relative_to(ROOT)}: python -m {module} {shlex.join(argv)}: exit {e.code}: "
                        f"{err.getvalue().strip().splitlines()[-1:]}")


@pytest.mark.parametrize(("argv", "ok"), [(["--prompt", "x", "--mode", "ar"], True), (["--prompt", "x", "--no_such_flag"], False),
                                          (["--mode", "nonsense", "--prompt", "x"], False)])
def test_the_parse_check_can_fail(argv, ok):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser("pdjax.decode").parse_args(argv)
            parsed = True
        except SystemExit:
            parsed = False
    assert parsed == ok
