"""The installed versions are the tested ones: constraints.txt pins every dependency that
pyproject.toml names, inside its range, and the image installs from it."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(line) for line in names]


def _locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


@pytest.mark.parametrize("requirement", _requirements(), ids=str)
def test_every_dependency_is_locked_inside_its_range(requirement: Requirement) -> None:
    locked = _locked()
    name = canonicalize_name(requirement.name)
    assert name in locked, f"{requirement.name} is not in constraints.txt (make lock)"
    assert requirement.specifier.contains(locked[name]), f"{requirement} excludes the lock"
    # An upper bound on the majors we have not tested (pandas-stubs and types-* follow their
    # library's version).
    if not name.startswith(("types-", "pandas-stubs")):
        assert any(spec.operator == "<" for spec in requirement.specifier), requirement


def test_torch_is_locked_without_a_build_label() -> None:
    torch = _locked()["torch"]
    assert torch.local is None  # the same pin takes the CPU or the CUDA build


@pytest.mark.skipif(os.environ.get("LATEST") == "1", reason="make test-latest: newest releases")
def test_the_suite_runs_on_the_locked_versions() -> None:
    """`make test` tests what it locked: no package of the environment is off its pin."""
    off = {}
    for name, version in _locked().items():
        installed = Version(metadata.version(name))
        if installed.public != str(version):
            off[name] = (str(installed), str(version))
    assert not off, f"installed != constraints.txt (run make test on a fresh .venv): {off}"


def test_the_image_installs_the_locked_versions() -> None:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    build = text.split("\nFROM ", 2)[1]
    torch = re.search(r"^RUN pip install .*whl/cpu.*$", build, re.MULTILINE)
    assert torch and "constraints.txt" in torch.group(0) and "--no-deps" in torch.group(0)
    assert re.search(r"^RUN pip install --constraint constraints\.txt \.$", build, re.MULTILINE)
    assert build.index("COPY constraints.txt") < torch.start()


def test_every_make_target_runs_in_the_bootstrapped_environment() -> None:
    """A fresh clone has no .venv: a target that called `.venv/bin/python` directly failed
    there (`make bench-quality`: "No such file or directory"); each goes through a script
    that sources scripts/bootstrap.sh, which makes or updates the environment first."""
    makefile = (ROOT / "Makefile").read_text()
    assert ".venv/bin" not in makefile
    recipes = [line[1:] for line in makefile.splitlines() if line.startswith("\t")]
    commands = [c.strip() for recipe in recipes for c in recipe.split("&&")]
    bare = [c for c in commands if not c.startswith(("./scripts/", "rm "))]
    assert len(commands) >= 8 and bare == [], bare  # `make clean` alone needs no environment
    done = subprocess.run(
        [str(ROOT / "scripts" / "in-venv.sh"), "python", "-c", "import sys; print(sys.prefix)"],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    venv = ROOT / os.environ.get("VENV", ".venv")  # make test-latest: .venv-latest
    assert Path(done.stdout.strip()).resolve() == venv.resolve()
