"""One list of tested versions: constraints.txt (written by scripts/constraints.py in CI's environment) agrees with
pyproject.toml's requirements and bounds, with jax's `tpu` extra, with the environment the tests run in, and it is
what launch/tpu.py's setup and both notebooks install under."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
NOTEBOOKS = ("decode.ipynb", "finetune.ipynb")


def _load(name: str, relative: str):
    """A script of the repository (not part of the package) imported as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


tool = _load("pdjax_scripts_constraints", "scripts/constraints.py")
launch = _load("pdjax_launch_tpu", "launch/tpu.py")
PINS = tool.read_constraints(CONSTRAINTS)


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": ""})


def test_constraints_file_is_exact_pins():
    assert len(PINS) > 50
    for name, version in PINS.items():
        assert name == canonicalize_name(name) and str(Version(version)) == version and "+" not in version, name
    for line in CONSTRAINTS.read_text().splitlines():
        assert line.startswith("#") or "==" in line, line


def test_read_constraints_rejects_what_pip_would_not_pin(tmp_path):
    bad = tmp_path / "c.txt"
    bad.write_text("jax>=0.10\n")
    with pytest.raises(ValueError, match="not a name==version line"):
        tool.read_constraints(bad)
    bad.write_text("jax==0.10.2\nJAX==0.10.2\n")
    with pytest.raises(ValueError, match="pinned twice"):
        tool.read_constraints(bad)


@pytest.mark.parametrize("group", ["dependencies", "test"])
def test_every_pyproject_requirement_is_pinned_within_its_bounds(group):
    """Each requirement of pdjax (and of its test extra) that applies here has a pin that satisfies it."""
    project = _pyproject()
    texts = project["dependencies"] if group == "dependencies" else project["optional-dependencies"]["test"]
    for req in filter(_applies, map(Requirement, texts)):
        name = canonicalize_name(req.name)
        assert name in PINS, f"{req}: not in constraints.txt (python scripts/constraints.py)"
        assert req.specifier.contains(PINS[name], prereleases=True), f"{req}: constraints.txt pins {PINS[name]}"


@pytest.mark.parametrize("package", ["jax", "jaxlib", "flax"])
def test_jax_jaxlib_and_flax_are_bounded_to_the_tested_series(package):
    """pip install -e . can pick neither the next minor release (0.x series) nor anything below the tested one."""
    (req,) = [r for r in map(Requirement, _pyproject()["dependencies"]) if canonicalize_name(r.name) == package]
    tested = Version(PINS[package])
    major, minor = tested.release[:2]
    following = Version(f"{major}.{minor + 1}.0") if major == 0 else Version(f"{major + 1}.0.0")
    assert req.specifier.contains(tested)
    assert not req.specifier.contains(following), f"{req} admits {following}, an untested series"
    assert not req.specifier.contains(Version(f"{major}.{minor}.0")) or tested == Version(f"{major}.{minor}.0")


def test_jax_tpu_extra_is_pinned_as_jax_pins_it():
    """jax's `tpu` extra (libtpu, the same jaxlib) is in constraints.txt, and pyproject's libtpu is jax's spec."""
    assert Version(metadata.version("jax")).public == PINS["jax"]
    tpu = [Requirement(r) for r in metadata.requires("jax") if "extra" in r and Requirement(r).marker.evaluate(
        {"extra": "tpu"}) and not Requirement(r).marker.evaluate({"extra": ""})]
    assert {canonicalize_name(r.name) for r in tpu} >= {"jaxlib", "libtpu"}
    for req in tpu:
        assert req.specifier.contains(PINS[canonicalize_name(req.name)], prereleases=True), str(req)
    (ours,) = [Requirement(r) for r in _pyproject()["optional-dependencies"]["test"] if r.startswith("libtpu")]
    (theirs,) = [r for r in tpu if r.name == "libtpu"]
    assert ours.specifier == theirs.specifier


def test_constraints_are_the_versions_installed_here():
    """The suite runs with exactly the pinned versions: after a dependency changed, rerun the suite and then
    `python scripts/constraints.py` in CI's environment (pip install -e ".[test]")."""
    diff = tool.differences(PINS, tool.tested_versions())
    assert diff == [], "constraints.txt is not this environment: " + "; ".join(diff)


def test_the_environment_check_can_fail():
    versions = tool.tested_versions()
    assert tool.differences({**versions, "jax": "0.0.1"}, versions) == [
        f"jax: constraints.txt 0.0.1, installed {versions['jax']}"]
    with pytest.raises(tool.EnvironmentMismatch, match="not installed"):
        tool.tested_versions(["pdjax-no-such-package-anywhere"])


# ---- who installs from it --------------------------------------------------------------------------------------


def test_launch_setup_installs_under_the_constraints_file():
    out = io.StringIO()
    with redirect_stdout(out):
        launch.main(["setup", "--name", "pd", "--zone", "us-east5-a", "--pdjax", "pdjax==0.1.0", "--dry-run"])
    scp, ssh = (shlex.split(line) for line in out.getvalue().splitlines())
    assert scp[5:7] == ["constraints.txt", f"pd:{launch.REMOTE_CONSTRAINTS}"] and (ROOT / scp[5]).samefile(CONSTRAINTS)
    install = next(step for step in ssh[-1].split("&&") if "pip install" in step and "-c" in step)
    argv = shlex.split(install)
    assert argv[argv.index("-c") + 1] == f"~/{launch.REMOTE_CONSTRAINTS}"
    pinned = dict(a.split("==") for a in argv if "==" in a)
    assert pinned == {"jax[tpu]": PINS["jax"], "pdjax": "0.1.0"}


def _install_cell(name: str) -> str:
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    (cell,) = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# Installs pdjax")]
    return "".join(cell["source"])


def test_both_notebooks_share_one_install_cell_without_pins_of_its_own():
    cell = _install_cell(NOTEBOOKS[0])
    assert cell == _install_cell(NOTEBOOKS[1])
    assert re.search(r"[\"'][\w.\[\]-]+(==|>=|<=|~=)", cell) is None, "versions come from constraints.txt only"


def _run_install_cell(name: str, monkeypatch, cwd: Path, tpu: bool, **params) -> list[list[str]]:
    """The notebook's install cell run where pdjax is not importable; the pip commands it would run."""
    import glob
    import importlib.util as util

    calls = []
    real_find_spec, real_glob = util.find_spec, glob.glob
    monkeypatch.setattr(util, "find_spec", lambda n, *a: None if n == "pdjax" else real_find_spec(n, *a))
    monkeypatch.setattr(glob, "glob", lambda p, *a, **k: ["/dev/accel0"] if tpu and "accel" in p else
                        ([] if "/dev/" in p else real_glob(p, *a, **k)))
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: calls.append(list(argv)))
    monkeypatch.chdir(cwd)
    scope = {"PDJAX_SOURCE": None, "PDJAX_CONSTRAINTS": None, **params}
    with redirect_stdout(io.StringIO()):
        exec(compile(_install_cell(name), name, "exec"), scope)
    return calls


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.parametrize("tpu", [False, True])
def test_notebook_installs_under_the_constraints_file(name, tpu, monkeypatch):
    """Opened from notebooks/ of a clone: one pip call, jax (jax[tpu] on a TPU) and the clone, under its
    constraints.txt, nothing pinned otherwise and no --no-deps (the dependencies come from the constraints)."""
    (call,) = _run_install_cell(name, monkeypatch, ROOT / "notebooks", tpu)
    assert call[:4] == [sys.executable, "-m", "pip", "install"]
    assert Path(call[call.index("-c") + 1]).samefile(CONSTRAINTS)
    rest = [a for a in call[4:] if a not in ("-q", "-c", call[call.index("-c") + 1])]
    assert rest == ["jax[tpu]" if tpu else "jax", str(ROOT)]


def test_notebook_from_a_wheel_needs_the_constraints_named(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="set PDJAX_CONSTRAINTS"):
        _run_install_cell(NOTEBOOKS[0], monkeypatch, tmp_path, False, PDJAX_SOURCE="pdjax-0.1.0-py3-none-any.whl")
    url = "https://example.org/constraints.txt"
    (call,) = _run_install_cell(NOTEBOOKS[0], monkeypatch, tmp_path, False, PDJAX_SOURCE="pdjax.whl",
                                PDJAX_CONSTRAINTS=url)
    assert call[call.index("-c") + 1] == url and call[-1] == "pdjax.whl"


def test_docs_install_under_the_constraints_file():
    """The pip commands that install jax on the TPU page and in the notebooks README name constraints.txt."""
    for page in (ROOT / "docs" / "tpu.md", ROOT / "notebooks" / "README.md"):
        commands = [l.strip().removeprefix("$ ") for l in page.read_text().splitlines()]
        lines = [l for l in commands if l.startswith("pip install") and "jax" in l]
        assert lines, page
        assert all("-c " in l and "constraints.txt" in l for l in lines), (page, lines)
