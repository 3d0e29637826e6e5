"""The package's shape: no import cycle among pdjax modules, and no source file over 600 lines.

Imports are read statically (ast), at module level and inside functions alike, so a cycle hidden in a
function-level import is found too; only `if TYPE_CHECKING:` blocks are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pdjax"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under an `if TYPE_CHECKING:` branch."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node) and child in node.body:
                continue
            stack.append(child)


def imported_modules(name: str, path: Path) -> set[str]:
    """The pdjax modules `name` imports: `import a.b` names a.b; `from a import b` names a.b when that is a module
    (else a); relative imports are resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return {m for m in found if m in MODULES and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert "pdjax.decode.cli" in graph and "pdjax.cli_errors" in graph["pdjax.decode.cli"]
    assert "pdjax.decode.dream" in graph["pdjax.decode.cli"]  # a function-level import counts
    assert "pdjax.structure" in graph["pdjax.decode.dream"]  # `from pdjax.structure import Segments`


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_are_resolved(tmp_path, monkeypatch):
    monkeypatch.setitem(MODULES, "pdjax.x.y", tmp_path / "y.py")
    monkeypatch.setitem(MODULES, "pdjax.x.z", tmp_path / "z.py")
    monkeypatch.setitem(MODULES, "pdjax.w", tmp_path / "w.py")
    (tmp_path / "y.py").write_text("from . import z\nfrom ..w import thing\n"
                                   "if TYPE_CHECKING:\n    import pdjax.x.q\n")
    assert imported_modules("pdjax.x.y", tmp_path / "y.py") == {"pdjax.x.z", "pdjax.w"}


def test_no_import_cycle_among_pdjax_modules():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert cycles(graph) == []


def _line_counts() -> dict[str, int]:
    return {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()}


def test_no_file_in_pdjax_is_over_600_lines():
    over = {f: n for f, n in _line_counts().items() if n > MAX_LINES}
    assert over == {}
