"""Fixtures for every tier: factories with overridable defaults."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

# No test may reach a metadata server or any Google endpoint: google-auth must not
# probe 169.254.169.254, whatever the machine is.
os.environ["NO_GCE_CHECK"] = "True"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"

from dispatcher.jobs import Job, JobStatus, new_job_id
from dispatcher.settings import Settings

REGIONS = ("us-central1", "europe-west4", "asia-northeast1")
MODEL = "gemini-test"


def model_config(model: str = MODEL, regions: tuple[str, ...] = REGIONS) -> str:
    """A MODEL_CONFIG value."""
    import json

    return json.dumps([{"model_id": model, "supported_regions": list(regions)}])


def base_env(**overrides: str) -> dict[str, str]:
    """The smallest valid environment, with overrides."""
    env = {
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "MODEL_ID": MODEL,
        "MODEL_CONFIG": model_config(),
    }
    env.update(overrides)
    return env


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    """Builds settings from the minimal environment plus overrides (env var names)."""

    def make(**overrides: str) -> Settings:
        return Settings.from_env(base_env(**overrides))

    return make


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    """A hand-driven UTC clock."""
    return Clock()


@pytest.fixture
def job_factory(clock: Clock) -> Callable[..., Job]:
    """Builds jobs with sensible defaults; any field may be overridden."""

    def make(**overrides: Any) -> Job:
        now = clock()
        fields: dict[str, Any] = {
            "job_id": new_job_id(),
            "model": MODEL,
            "region": REGIONS[0],
            "request": {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]},
            "status": JobStatus.PENDING,
            "created_at": now,
            "updated_at": now,
            "expire_at": now + timedelta(days=7),
            "sweep_at": now + timedelta(seconds=60),
        }
        fields.update(overrides)
        return Job(**fields)

    return make
