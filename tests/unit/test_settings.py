"""Settings: parsed once, every problem named by its variable."""

from __future__ import annotations

import pytest

from dispatcher.errors import ConfigError
from dispatcher.settings import Mode, Settings
from tests.conftest import MODEL, REGIONS, base_env


def test_defaults_match_the_contract() -> None:
    """Unset optional settings take the documented defaults."""
    settings = Settings.from_env(base_env())
    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert settings.vertex_max_retries == 3
    assert settings.vertex_backoff_initial_s == 1.0
    assert settings.vertex_backoff_max_s == 30.0
    assert settings.max_request_bytes == 8 * 1024 * 1024
    assert settings.model.regions == REGIONS
    assert settings.mode is Mode.MEMORY


@pytest.mark.parametrize(
    ("overrides", "mode"),
    [
        ({}, Mode.MEMORY),
        ({"FIRESTORE_COLLECTION": "jobs", "FIRESTORE_DATABASE": "(default)"}, Mode.FIRESTORE),
        (
            {"FIRESTORE_COLLECTION": "jobs", "FIRESTORE_DATABASE": "db", "PUBSUB_TOPIC": "jobs"},
            Mode.PUBSUB,
        ),
    ],
)
def test_mode_follows_what_is_configured(overrides: dict[str, str], mode: Mode) -> None:
    """The three modes are chosen by FIRESTORE_COLLECTION and PUBSUB_TOPIC."""
    assert Settings.from_env(base_env(**overrides)).mode is mode


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        ({"GOOGLE_CLOUD_PROJECT": ""}, "GOOGLE_CLOUD_PROJECT", "required"),
        ({"MODEL_ID": ""}, "MODEL_ID", "required"),
        ({"MODEL_CONFIG": ""}, "MODEL_CONFIG", "required"),
        ({"MODEL_CONFIG": "{not json"}, "MODEL_CONFIG", "not valid JSON"),
        ({"MODEL_CONFIG": "[]"}, "MODEL_CONFIG", "non-empty"),
        (
            {"MODEL_CONFIG": '[{"model_id": "x", "supported_regions": ["us-central1"]}]'},
            "MODEL_CONFIG",
            "no entry for MODEL_ID",
        ),
        (
            {"MODEL_CONFIG": f'[{{"model_id": "{MODEL}", "supported_regions": []}}]'},
            "MODEL_CONFIG",
            "supported_regions",
        ),
        (
            {"MODEL_CONFIG": f'[{{"model_id": "{MODEL}", "supported_regions": ["Bad Region"]}}]'},
            "MODEL_CONFIG",
            "supported_regions",
        ),
        ({"FIRESTORE_COLLECTION": "jobs"}, "FIRESTORE_DATABASE", "required"),
        ({"PUBSUB_TOPIC": "jobs"}, "PUBSUB_TOPIC", "FIRESTORE_COLLECTION"),
        ({"PORT": "eighty"}, "PORT", "not an integer"),
        ({"PORT": "70000"}, "PORT", "outside"),
        ({"VERTEX_MAX_RETRIES": "-1"}, "VERTEX_MAX_RETRIES", "outside"),
        ({"VERTEX_BACKOFF_INITIAL_S": "fast"}, "VERTEX_BACKOFF_INITIAL_S", "not a number"),
        (
            {"VERTEX_BACKOFF_INITIAL_S": "5", "VERTEX_BACKOFF_MAX_S": "1"},
            "VERTEX_BACKOFF_MAX_S",
            "below",
        ),
        ({"VERTEX_API_ENDPOINT": "ftp://x"}, "VERTEX_API_ENDPOINT", "not an http(s) URL"),
        ({"LOG_PAYLOADS": "maybe"}, "LOG_PAYLOADS", "boolean"),
        (
            {"MAX_PENDING_JOBS": "20", "MEMORY_MAX_JOBS": "10"},
            "MAX_PENDING_JOBS",
            "MEMORY_MAX_JOBS",
        ),
    ],
)
def test_bad_setting_names_its_variable(env: dict[str, str], variable: str, words: str) -> None:
    """A missing or malformed setting raises ConfigError naming the variable and the problem."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(base_env(**env))
    assert caught.value.variable == variable
    assert words in str(caught.value)


def test_plain_http_endpoint_gets_no_credentials() -> None:
    """An http:// Vertex endpoint is never sent Google credentials; https is."""
    assert not Settings.from_env(
        base_env(VERTEX_API_ENDPOINT="http://127.0.0.1:1")
    ).vertex_sends_credentials
    assert Settings.from_env(
        base_env(VERTEX_API_ENDPOINT="https://proxy.example")
    ).vertex_sends_credentials
    assert Settings.from_env(base_env()).vertex_sends_credentials
