"""Each Dockerfile's start command, run against the local stack.

No Docker engine runs on these machines, so the images themselves are never
built here (Cloud Build builds them on deploy). What this covers: the exact
`CMD` of each Dockerfile, run with this venv's Python and the image's
environment variables, serves the pipeline end to end in mode 3 on the
emulators. What it does not cover: the base image, the non-root user, and the
install from requirements.lock (hadolint and tests/unit/test_infra.py check
those files statically).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.processes import ServiceProcess
from tests.support.stack import ROOT, Stack, unique

pytestmark = pytest.mark.integration


def image_command(dockerfile: Path) -> list[str]:
    """The exec-form CMD of a Dockerfile."""
    [line] = [line for line in dockerfile.read_text().splitlines() if line.startswith("CMD ")]
    return list(json.loads(line.removeprefix("CMD ")))


def image_env(dockerfile: Path) -> dict[str, str]:
    """The runtime stage's plain ENV values (PATH, which points into the image, left out)."""
    runtime_stage = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
    pairs = re.findall(r"([A-Z_]+)=([^\s\\]+)", runtime_stage.split("RUN", 1)[0])
    return {key: value for key, value in pairs if key != "PATH"}


def test_dockerfile_commands_serve_the_pipeline(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """The ingress and worker images' CMDs, started as written, run a job to succeeded."""
    stack = stack_factory("pubsub")
    assert stack.worker is not None
    for service, process in (("ingress", stack.ingress), ("worker", stack.worker)):
        dockerfile = ROOT / f"Dockerfile.{service}"
        command = image_command(dockerfile)
        assert command == ["python", "-m", service]
        env = {**stack.env, **image_env(dockerfile)}
        port = process.port
        process.terminate()
        # Same port: the push subscription delivers to the worker's address.
        replacement = ServiceProcess.start(command[2], env, log_dir=tmp_path, port=port)
        if service == "ingress":
            stack.ingresses[0] = replacement
        else:
            stack.worker = replacement
    view = stack.wait(stack.submit_ok(unique("image")), timeout=60)
    assert view["status"] == "succeeded"
