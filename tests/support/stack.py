"""A running local stack for integration tests: stand-in, ingress(es), worker, emulators.

Everything is a real process on loopback; the tests talk to it over HTTP only.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.processes import ServiceProcess, base_child_env

ROOT = Path(__file__).resolve().parents[2]
REGIONS = ("us-central1", "europe-west4", "asia-northeast1")
MODEL = "gemini-test"
PROJECT = "test-project"
TERMINAL = {"succeeded", "failed", "cancelled"}


def prompt(text: str) -> dict[str, Any]:
    """A minimal GenerateContentRequest."""
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def unique(prefix: str) -> str:
    """A name no other test uses (collections, topics, prompts)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Stack:
    """Handles on the processes of one test's stack."""

    standin: ServiceProcess
    ingresses: list[ServiceProcess]
    worker: ServiceProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    @property
    def ingress(self) -> ServiceProcess:
        """The first ingress."""
        return self.ingresses[0]

    def submit(self, body: Any, *, ingress: int = 0, **kwargs: Any) -> httpx.Response:
        """POST /generate with a JSON body (or raw bytes via content=)."""
        url = f"{self.ingresses[ingress].url}/generate"
        if "content" in kwargs:
            return self.http.post(url, **kwargs)
        return self.http.post(url, json=body, **kwargs)

    def submit_ok(self, text: str, **kwargs: Any) -> str:
        """Submit a prompt, check the 202, return the job id."""
        response = self.submit(prompt(text), **kwargs)
        assert response.status_code == 202, response.text
        return str(response.json()["job_id"])

    def job(self, job_id: str, *, ingress: int = 0) -> dict[str, Any]:
        """GET /jobs/{id} (200 expected)."""
        response = self.http.get(f"{self.ingresses[ingress].url}/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait(self, job_id: str, *, timeout: float = 60.0, ingress: int = 0) -> dict[str, Any]:
        """Poll until the job is terminal."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id, ingress=ingress)
            if view["status"] in TERMINAL:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {view['status']} after {timeout} s")
            time.sleep(0.05)

    def standin_stats(self) -> dict[str, Any]:
        """The stand-in's counters."""
        return dict(self.http.get(f"{self.standin.url}/_standin/stats").json())

    def configure_standin(self, config: Mapping[str, Any]) -> None:
        """Replace the stand-in's behaviour."""
        response = self.http.put(f"{self.standin.url}/_standin/config", json=dict(config))
        assert response.status_code == 200, response.text

    def close(self) -> None:
        """Stop every process."""
        for process in [*self.ingresses, self.worker, self.standin]:
            if process is not None:
                process.terminate()
        self.http.close()


def start_standin(log_dir: Path, config: Mapping[str, Any] | None = None) -> ServiceProcess:
    """The Vertex stand-in as a process."""
    args = ["--host", "127.0.0.1"]
    if config:
        args += ["--config", json.dumps(dict(config))]
    return ServiceProcess.start(
        "dispatcher_devtools.vertex_standin",
        {},
        log_dir=log_dir,
        args=args,
        port_flag=True,
    )


def service_env(standin: ServiceProcess, **overrides: str) -> dict[str, str]:
    """The environment of an ingress or worker pointed at the stand-in."""
    env = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "MODEL_ID": MODEL,
        "MODEL_CONFIG": json.dumps([{"model_id": MODEL, "supported_regions": list(REGIONS)}]),
        "VERTEX_API_ENDPOINT": standin.url,
        "VERTEX_BACKOFF_INITIAL_S": "0.01",
        "VERTEX_BACKOFF_MAX_S": "0.05",
        "REGION_COOLDOWN_INITIAL_S": "0.05",
        "REGION_COOLDOWN_MAX_S": "0.2",
        "REQUEUE_DELAY_S": "0.1",
        "LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    return env


def create_push_subscription(
    pubsub_env: Mapping[str, str],
    *,
    topic: str,
    subscription: str,
    endpoint: str,
    ack_deadline: int = 30,
    min_retry_delay: str = "1s",
    max_retry_delay: str = "5s",
) -> None:
    """Create the topic and a push subscription to `endpoint` with the project's own script."""
    command = [
        "bash",
        str(ROOT / "infra" / "pubsub.sh"),
        "--project",
        PROJECT,
        "--topic",
        topic,
        "--subscription",
        subscription,
        "--push-endpoint",
        endpoint,
        "--ack-deadline",
        str(ack_deadline),
        "--min-retry-delay",
        min_retry_delay,
        "--max-retry-delay",
        max_retry_delay,
    ]
    host = pubsub_env["PUBSUB_EMULATOR_HOST"]
    env = base_child_env(
        {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://{host}/",
            "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
            "CLOUDSDK_CORE_PROJECT": PROJECT,
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        }
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
