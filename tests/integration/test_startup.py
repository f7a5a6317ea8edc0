"""Start-up of each entry point as a real process: bad settings, the stand-in's CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import base_env

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["ingress", "worker"])
def test_service_refuses_bad_config_with_one_line(module: str) -> None:
    """Starting a service with a bad setting prints one line naming it, no traceback."""
    env = {"PATH": "/usr/bin:/bin", **base_env(MODEL_CONFIG="[oops")}
    done = subprocess.run(
        [sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "MODEL_CONFIG" in lines[0]
    assert "Traceback" not in done.stderr


async def test_cli_serves_on_a_free_port() -> None:
    """`python -m ... --port 0` prints its real address once ready and serves it."""
    config = json.dumps({"regions": {"europe-west4": {"status": 503}}})
    env = {k: v for k, v in os.environ.items() if k != "VERTEX_STANDIN_CONFIG"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher_devtools.vertex_standin",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--config",
        config,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode().strip()
        prefix = "vertex-standin listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        assert int(line.removeprefix(prefix)) > 0
        base_url = line.removeprefix("vertex-standin listening on ")
        async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=10) as client:
            health = await client.get("/healthz")
            down = await client.post(
                "/v1/projects/p/locations/europe-west4/publishers/google/models/m:generateContent",
                json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            )
        assert (health.status_code, health.text) == (200, "ok")
        assert down.status_code == 503
    finally:
        if process.returncode is None:
            process.terminate()
        returncode = await asyncio.wait_for(process.wait(), timeout=15)
    # uvicorn exits gracefully, then re-raises the SIGTERM it caught.
    assert returncode in (0, -signal.SIGTERM)
