"""The deployment scripts and images, read: what holds without running anything.

Running them (shellcheck, hadolint, the scripts' dry runs) starts processes, so
those tests are in tests/integration/test_scripts.py.
"""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCRIPTS = sorted(INFRA.glob("*.sh"))
DOCKERFILES = [ROOT / "Dockerfile.ingress", ROOT / "Dockerfile.worker"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable_strict_bash(script: Path) -> None:
    """Every script is executable, runs bash from PATH and sets -euo pipefail."""
    text = script.read_text()
    assert script.stat().st_mode & stat.S_IXUSR
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_readme_command_as_non_root(dockerfile: Path) -> None:
    """Each image starts its service with python -m, as a non-root user, unbuffered."""
    service = dockerfile.suffix.lstrip(".")
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    assert lines[-1] == f'CMD ["python", "-m", "{service}"]'
    assert sum(line.startswith("FROM ") for line in lines) == 2
    user = [line for line in lines if line.startswith("USER ")]
    assert user
    assert user[-1] not in ("USER root", "USER 0", "USER 0:0")
    assert any("PYTHONUNBUFFERED=1" in line for line in lines)
    assert any("--require-hashes" in line and "requirements.lock" in line for line in lines)


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """requirements.lock satisfies pyproject's runtime dependencies, every pin hashed."""
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins: dict[str, Version] = {}
    for number, line in enumerate(lines):
        if line and not line[0].isspace() and not line.startswith("#"):
            name, _, version = line.split()[0].partition("==")
            assert version, f"requirements.lock line {number + 1} is not pinned: {line}"
            assert lines[number + 1].strip().startswith("--hash=sha256:"), f"{name} has no hash"
            pins[canonicalize_name(name)] = Version(version)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in map(Requirement, project["dependencies"]):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{name} is not in requirements.lock: regenerate it"
        assert dependency.specifier.contains(pins[name]), (
            f"{name}=={pins[name]} breaks {dependency}"
        )
