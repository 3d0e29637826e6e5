"""Write constraints.txt: the exact versions of every package CI installed, so the TPU workers, the notebooks and the
docs install what the tests ran.

    python scripts/constraints.py            # rewrite constraints.txt from the active environment
    python scripts/constraints.py --check    # exit 1 (with the differences) when constraints.txt disagrees

Run it in CI's environment: the virtual environment `.ci/run` builds with `pip install -e ".[test]"`, after the
suite passed there. It lists pdjax's requirements with the `test` extra (read from pyproject.toml, not from the
installed metadata, which an editable install leaves stale) and jax's `tpu` extra (libtpu), and theirs, down to
the leaves, as installed here (markers evaluated for this interpreter and platform), one
`name==version` a line. A local version label (torch's `+cpu`) is dropped: `==2.13.0` matches `2.13.0+cpu`.
A requirement that is not installed is an error: the environment is not the one CI tested.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import platform
import sys
import tomllib
from pathlib import Path
from typing import Iterable

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
EXTRA = "test"  # CI installs pdjax with this extra
TPU_ROOT = "jax[tpu]"  # the TPU runtime jax pins for its version (libtpu)
HEADER = """\
# The exact versions CI ran the test suite with (the venv of .ci/run: pip install -e ".[test]"), and jax's
# `tpu` extra (libtpu). Written by `python scripts/constraints.py` in that environment ({where});
# do not edit by hand. Install with: pip install -c constraints.txt ...
"""


class EnvironmentMismatch(RuntimeError):
    """A requirement of the closure is not installed here."""


def _release(version: str) -> str:
    """The version without its local label (`2.13.0+cpu` -> `2.13.0`)."""
    return Version(version).public


def pdjax_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """pdjax's dependencies and its `test` extra, as pyproject.toml states them now."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    return [*project["dependencies"], *project["optional-dependencies"][EXTRA]]


def tested_versions(roots: Iterable[str] | None = None) -> dict[str, str]:
    """{canonical name: installed version} of `roots` (default: pdjax's requirements and jax[tpu]) and everything
    they require here; requirements whose markers exclude this platform are left out."""
    roots = [*pdjax_requirements(), TPU_ROOT] if roots is None else list(roots)
    pending = [r for r in map(Requirement, roots) if r.marker is None or r.marker.evaluate({"extra": ""})]
    walked: dict[str, set[str]] = {}  # name -> extras already followed
    versions: dict[str, str] = {}
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        extras = {canonicalize_name(e) for e in req.extras}
        if name in walked and extras <= walked[name]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise EnvironmentMismatch(f"{req} is required but not installed: run this in CI's environment") from None
        walked.setdefault(name, set()).update(extras)
        versions[name] = _release(dist.version)
        for text in dist.requires or ():
            child = Requirement(text)
            wanted = child.marker is None or any(
                child.marker.evaluate({"extra": extra}) for extra in ("", *sorted(walked[name])))
            if wanted:
                pending.append(child)
    return dict(sorted(versions.items()))


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} of a constraints file of `name==version` lines (# comments allowed)."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: not a name==version line: {line!r}")
        key = canonicalize_name(name.strip())
        if key in pins:
            raise ValueError(f"{path}:{number}: {key} is pinned twice")
        pins[key] = version.strip()
    return pins


def render(versions: dict[str, str]) -> str:
    """The constraints file's text for `versions`."""
    where = f"Python {platform.python_version()}, {sys.platform} {platform.machine()}"
    return HEADER.format(where=where) + "".join(f"{name}=={version}\n" for name, version in versions.items())


def differences(pins: dict[str, str], versions: dict[str, str]) -> list[str]:
    """One line per package where the file and the environment disagree."""
    lines = []
    for name in sorted(pins.keys() | versions.keys()):
        if pins.get(name) != versions.get(name):
            lines.append(f"{name}: constraints.txt {pins.get(name, '(absent)')}, installed {versions.get(name, '(absent)')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/constraints.py", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    p.add_argument("--out", type=Path, default=CONSTRAINTS)
    args = p.parse_args(argv)
    try:
        versions = tested_versions()
    except EnvironmentMismatch as e:
        print(f"scripts/constraints.py: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        diff = differences(read_constraints(args.out), versions)
        print("\n".join(diff) if diff else f"{args.out}: {len(versions)} packages, as installed")
        return 1 if diff else 0
    args.out.write_text(render(versions), encoding="utf-8")
    print(f"wrote {args.out}: {len(versions)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
