"""What the images ship, read statically: the services only, no CLI, no dev tools.

The Dockerfiles install requirements.lock and the root distribution; the CLI (cli/,
`vertex_dispatch`) and the dev tools (devtools/, `dispatcher_devtools`) are
distributions of their own and must stay out of both.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_namespace_packages, find_packages

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile.ingress", ROOT / "Dockerfile.worker"]
SERVICE_PACKAGES = frozenset({"dispatcher", "ingress", "worker"})
# What an image may copy from the build context (the .dockerignore allows no more).
IMAGE_SOURCES = frozenset({"pyproject.toml", "requirements.lock", *SERVICE_PACKAGES})
# Distributions only the CLI, the tests, the tooling or the dev tools need.
NOT_IN_IMAGES = frozenset(
    {
        "pytest",
        "google-genai",
        "mypy",
        "ruff",
        "tqdm",
        "rich",
        "hypothesis",
        "functions-framework",
    }
)
OUTSIDE_PACKAGES = frozenset({"vertex_dispatch", "dispatcher_devtools"})


def _pyproject(path: Path = ROOT / "pyproject.toml") -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


def _shipped_packages() -> list[str]:
    """The packages `pip install .` puts in an image, as setuptools finds them."""
    config = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    # pyproject's `packages.find` looks for namespace packages unless told otherwise.
    finder = find_namespace_packages if config.get("namespaces", True) else find_packages
    found: list[str] = []
    for where in config.get("where", ["."]):
        found += finder(
            where=str(ROOT / where),
            include=config.get("include", ["*"]),
            exclude=config.get("exclude", []),
        )
    # Bytecode caches of a local checkout; a build context has none (.dockerignore).
    return sorted(name for name in found if "__pycache__" not in name.split("."))


def _copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context."""
    copies = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        *sources, destination = [w for w in words[1:] if not w.startswith("--")]
        copies += [(source, destination) for source in sources]
    return copies


def _lock_names() -> set[str]:
    pinned = re.findall(
        r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", (ROOT / "requirements.lock").read_text(), re.M
    )
    return {canonicalize_name(name) for name in pinned}


def test_root_distribution_ships_only_the_services() -> None:
    """setuptools finds dispatcher, ingress, worker and their subpackages, nothing else."""
    packages = _shipped_packages()

    assert {name.split(".")[0] for name in packages} == SERVICE_PACKAGES
    assert not [name for name in packages if set(name.split(".")) & OUTSIDE_PACKAGES]
    assert "dispatcher.devtools" not in packages


def test_shipped_packages_import_no_cli_or_dev_tools() -> None:
    """No module of the shipped packages imports the CLI or the dev tools."""
    offenders = []
    for package in SERVICE_PACKAGES:
        for module in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(module.read_text(), str(module))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                if any(name.split(".")[0] in OUTSIDE_PACKAGES for name in names):
                    offenders.append(f"{module.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_the_lock_pyproject_and_packages(dockerfile: Path) -> None:
    """Each image copies the lock, pyproject.toml, the core and its own service only."""
    service = dockerfile.suffix.lstrip(".")
    copies = _copies(dockerfile)
    sources = {source.rstrip("/") for source, _ in copies}

    assert sources == {"requirements.lock", "pyproject.toml", "dispatcher", service}
    assert sources <= IMAGE_SOURCES
    # Each package lands under its own name, where setuptools' find looks for it.
    for source, destination in copies:
        if source in SERVICE_PACKAGES:
            assert destination.rstrip("/") in (source, f"./{source}")


def test_dockerignore_lets_in_only_the_image_sources() -> None:
    """The build context holds what the images copy and nothing more."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}

    assert "*" in lines
    assert allowed == IMAGE_SOURCES


def test_lock_holds_no_cli_dev_or_devtools_distribution() -> None:
    """requirements.lock pins none of the CLI's, the tests', the tools' distributions."""
    assert _lock_names() & NOT_IN_IMAGES == set()


def test_lock_holds_no_dependency_of_the_cli_only() -> None:
    """What only cli/pyproject.toml asks for (beyond the services' own) is not locked."""
    services = _pyproject()["project"]["dependencies"]
    cli = _pyproject(ROOT / "cli" / "pyproject.toml")["project"]["dependencies"]
    service_names = {canonicalize_name(Requirement(spec).name) for spec in services}
    cli_only = {canonicalize_name(Requirement(spec).name) for spec in cli} - service_names

    assert cli_only  # the CLI has a dependency of its own (tqdm) to look for
    assert _lock_names() & cli_only == set()
