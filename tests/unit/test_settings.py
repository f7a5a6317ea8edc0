"""Settings: declared once, parsed once, every problem named by its variable."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from dispatcher.errors import ConfigError
from dispatcher.regions import PoolConfig
from dispatcher.settings import (
    DECLARED,
    DEFAULTS,
    Declaration,
    Mode,
    RegionStrategy,
    Settings,
    readme_table,
)
from dispatcher.vertex import RetryPolicy
from tests.conftest import MODEL, REGIONS, base_env

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
# The one row of the README's table that is not ours: the client libraries read these.
EMULATOR_ROW = (
    "| `FIRESTORE_EMULATOR_HOST`, `PUBSUB_EMULATOR_HOST` | unset | as the client libraries "
    "define them |"
)
NUMBERS = [d for d in DECLARED if d.low is not None and d.high is not None]


def _table_after(heading: str, head: str) -> list[str]:
    """The lines of the first markdown table starting with `head` after `heading`."""
    text = README[README.index(heading) :]
    lines = text[text.index(head) :].splitlines()
    return lines[: lines.index("")]


def test_defaults_match_the_contract() -> None:
    """Unset optional settings take the documented defaults."""
    settings = Settings.from_env(base_env())
    assert settings.host == "0.0.0.0"
    assert settings.port == 8080
    assert settings.vertex_max_retries == 3
    assert settings.vertex_backoff_initial_s == 1.0
    assert settings.vertex_backoff_max_s == 30.0
    assert settings.max_request_bytes == 8 * 1024 * 1024
    assert settings.region_strategy is RegionStrategy.ADAPTIVE
    assert settings.model.regions == REGIONS
    assert settings.mode is Mode.MEMORY


def test_every_declared_default_is_what_an_empty_environment_yields() -> None:
    """With only the required variables set, each field holds its declared default."""
    required = {d.env for d in DECLARED if d.required}
    assert required == {"GOOGLE_CLOUD_PROJECT", "MODEL_ID", "MODEL_CONFIG"}
    settings = Settings.from_env(base_env())
    assert {d.name: getattr(settings, d.name) for d in DECLARED if not d.required} == DEFAULTS
    blank = dict.fromkeys((d.env for d in DECLARED if not d.required), "  ")
    assert Settings.from_env(base_env(**blank)) == settings  # an empty variable is unset


def test_every_field_is_declared_once() -> None:
    """Each Settings field has one declaration, and no two read the same variable."""
    assert [d.name for d in DECLARED] == [f.name for f in dataclasses.fields(Settings)]
    assert len({d.env for d in DECLARED}) == len(DECLARED)
    assert all(d.doc and "\n" not in d.doc and "|" not in d.doc for d in DECLARED)


def test_readme_settings_table_is_generated_from_the_declarations() -> None:
    """The README's table holds each setting's name, default and doc line, in order."""
    table = _table_after("## Settings", "| variable | default | meaning |")
    assert table == [*readme_table().splitlines(), EMULATOR_ROW]


def test_readme_security_table_names_declared_settings() -> None:
    """Every variable in the Security section's settings table is a declared setting."""
    table = _table_after("### Settings", "| variable | service | default | protects |")
    names = {row.split("|")[1].strip().strip("`") for row in table[2:]}
    assert names and names <= {d.env for d in DECLARED}


def test_settings_module_depends_on_nothing_above_it() -> None:
    """dispatcher.settings imports no dispatcher module but errors (auth, regions... import it)."""
    tree = ast.parse((REPO / "dispatcher" / "settings.py").read_text(encoding="utf-8"))
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert {name for name in imported if name.startswith("dispatcher")} == {"dispatcher.errors"}


def test_pool_config_defaults_are_the_settings_defaults() -> None:
    """PoolConfig's tunable defaults come from the REGION_* declarations: they cannot drift."""
    defaults = Settings.from_env(base_env())
    assert PoolConfig() == PoolConfig.from_settings(defaults)
    changed = Settings.from_env(base_env(REGION_CONCURRENCY_MAX="17", REGION_STRATEGY="naive"))
    config = PoolConfig.from_settings(changed)
    assert (config.concurrency_max, config.strategy) == (17, RegionStrategy.NAIVE)


def test_values_for_maps_a_prefix_and_leaves_other_fields_out() -> None:
    """`values_for(RetryPolicy, prefix="vertex_")` picks the VERTEX_* values it has fields for."""
    settings = Settings.from_env(base_env(VERTEX_MAX_RETRIES="7"))
    assert settings.values_for(RetryPolicy, prefix="vertex_") == {
        "max_retries": 7,
        "backoff_initial_s": 1.0,
        "backoff_max_s": 30.0,
    }


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


def _out_of_range(declared: Declaration, side: str) -> str:
    assert declared.low is not None and declared.high is not None
    if side == "low":
        step = 1 if isinstance(declared.default, int) else max(declared.low / 2, 0.001)
        return str(declared.low - step)
    return str(declared.high + 1)


@pytest.mark.parametrize("declared", NUMBERS, ids=[d.env for d in NUMBERS])
@pytest.mark.parametrize("side", ["low", "high"])
def test_number_outside_its_bounds_names_the_variable_and_the_range(
    declared: Declaration, side: str
) -> None:
    """A value just past either bound is refused with the variable and the allowed range."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(base_env(**{declared.env: _out_of_range(declared, side)}))
    assert caught.value.variable == declared.env
    assert "outside the allowed" in str(caught.value)
    assert f" {declared.allowed}" in str(caught.value)


@pytest.mark.parametrize("declared", NUMBERS, ids=[d.env for d in NUMBERS])
def test_number_that_is_no_number_names_the_variable_and_the_range(
    declared: Declaration,
) -> None:
    """Text that is not a number is refused, saying which kind and range are allowed."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(base_env(**{declared.env: "lots"}))
    noun = "an integer" if isinstance(declared.default, int) else "a number"
    assert caught.value.variable == declared.env
    assert f"'lots' is not {noun} (allowed: {declared.allowed})" in str(caught.value)


@pytest.mark.parametrize("declared", NUMBERS, ids=[d.env for d in NUMBERS])
def test_number_bounds_are_inclusive_and_hold_the_default(declared: Declaration) -> None:
    """Both bounds parse, and the default lies between them."""
    assert declared.low is not None and declared.high is not None
    assert declared.parse(str(declared.low)) == declared.low
    assert declared.parse(str(declared.high)) == declared.high
    assert declared.low <= declared.default <= declared.high


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_float_specials_are_refused(raw: str) -> None:
    """nan and infinities are outside every range."""
    with pytest.raises(ConfigError, match=r"LEASE_S: .* outside the allowed 1\.\.3600"):
        Settings.from_env(base_env(LEASE_S=raw))
    assert math.isfinite(Settings.from_env(base_env()).lease_s)


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"LOG_LEVEL": "debug"}, "log_level", "DEBUG"),
        ({"REGION_STRATEGY": "naive"}, "region_strategy", RegionStrategy.NAIVE),
        (
            {"VERTEX_API_ENDPOINT": "http://127.0.0.1:9/"},
            "vertex_api_endpoint",
            "http://127.0.0.1:9",
        ),
        ({"PORT": " 9000 "}, "port", 9000),
        ({"API_KEYS_FILE": "/no/such/file"}, "api_keys_file", "/no/such/file"),
    ],
)
def test_values_are_parsed(env: dict[str, str], field: str, value: object) -> None:
    """Words are normalised, URLs lose their trailing slash, a file is only a path here."""
    assert getattr(Settings.from_env(base_env(**env)), field) == value


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        ({"GOOGLE_CLOUD_PROJECT": ""}, "GOOGLE_CLOUD_PROJECT", "required"),
        ({"MODEL_ID": ""}, "MODEL_ID", "required"),
        ({"MODEL_ID": "no spaces"}, "MODEL_ID", "not a model id"),
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
        (
            {"FIRESTORE_COLLECTION": "a/b", "FIRESTORE_DATABASE": "db"},
            "FIRESTORE_COLLECTION",
            "'/'",
        ),
        ({"FIRESTORE_COLLECTION": "jobs"}, "FIRESTORE_DATABASE", "required"),
        ({"PUBSUB_TOPIC": "jobs"}, "PUBSUB_TOPIC", "FIRESTORE_COLLECTION"),
        (
            {"FIRESTORE_COLLECTION": "j", "FIRESTORE_DATABASE": "d", "PUBSUB_TOPIC": "-x"},
            "PUBSUB_TOPIC",
            "not a topic id",
        ),
        (
            {"FIRESTORE_COLLECTION": "j", "FIRESTORE_DATABASE": "d", "INTERACTIVE_TOPIC": "fast"},
            "INTERACTIVE_TOPIC",
            "needs PUBSUB_TOPIC",
        ),
        (
            {
                "FIRESTORE_COLLECTION": "j",
                "FIRESTORE_DATABASE": "d",
                "PUBSUB_TOPIC": "jobs",
                "INTERACTIVE_TOPIC": "jobs",
            },
            "INTERACTIVE_TOPIC",
            "must differ from PUBSUB_TOPIC",
        ),
        (
            {"VERTEX_BACKOFF_INITIAL_S": "5", "VERTEX_BACKOFF_MAX_S": "1"},
            "VERTEX_BACKOFF_MAX_S",
            "below",
        ),
        (
            {"REGION_COOLDOWN_INITIAL_S": "5", "REGION_COOLDOWN_MAX_S": "1"},
            "REGION_COOLDOWN_MAX_S",
            "below",
        ),
        ({"REGION_CONCURRENCY_MIN": "20"}, "REGION_CONCURRENCY_INITIAL", "between"),
        ({"VERTEX_API_ENDPOINT": "ftp://x"}, "VERTEX_API_ENDPOINT", "not an http(s) URL"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "not one of DEBUG, INFO, WARNING, ERROR"),
        ({"REGION_STRATEGY": "ADAPTIVE"}, "REGION_STRATEGY", "not one of adaptive, naive"),
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
