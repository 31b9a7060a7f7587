"""The lock file pins what pyproject.toml asks for, and every install goes through it."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import REPO

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line.strip())
        assert match, f"requirements.lock: {line!r} is not NAME==VERSION"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements.lock pins {name} twice"
        pins[name] = Version(match.group(2))
    return pins


def test_the_lock_pins_every_dependency_within_its_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = locked()
    problems = []
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} is not in requirements.lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}: locked {pins[name]} is outside {requirement.specifier}")
    assert problems == [], "; ".join(problems) + " (run `make lock`)"
    assert "sieve" not in pins  # the project itself is installed from the tree


def test_make_and_the_image_install_through_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK := requirements.lock" in makefile
    assert "pip install --quiet --no-cache-dir -c $(LOCK) -e '.[test]'" in makefile
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile and "pip install -c requirements.lock ." in dockerfile
    assert locked()["torch"] == Version("2.14.1")  # the pin the Dockerfile's torch layer uses
