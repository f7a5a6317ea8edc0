"""Configuration, parsed once from the environment into a frozen object.

Only the services' entry points call `Settings.from_env(os.environ)`; the core
receives the object. Every problem names the variable it comes from.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from dispatcher.auth import GOOGLE_CERTS_URL, ApiKeyStore
from dispatcher.errors import ConfigError
from dispatcher.regions import RegionStrategy

_T = TypeVar("_T", int, float)
_REGION = re.compile(r"^(global|[a-z]+-[a-z]+\d+)$")
_TOPIC = re.compile(r"^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$")
_COLLECTION = re.compile(r"^[^/]{1,1500}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
MIB = 1024 * 1024


class Mode(enum.StrEnum):
    """Where jobs are kept and who executes them."""

    MEMORY = "memory"  # one process: jobs in memory, executed in-process
    FIRESTORE = "firestore"  # jobs in Firestore, executed in-process by each ingress
    PUBSUB = "pubsub"  # jobs in Firestore, published to Pub/Sub, executed by the worker


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """One model and the regions that serve it, in round-robin order."""

    model_id: str
    regions: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the services are told from outside."""

    project: str
    model_id: str
    models: Mapping[str, ModelConfig]
    host: str = "0.0.0.0"  # noqa: S104 - a Cloud Run container must listen on every interface
    port: int = 8080
    firestore_collection: str | None = None
    firestore_database: str | None = None
    pubsub_topic: str | None = None
    vertex_api_endpoint: str | None = None
    vertex_max_retries: int = 3
    vertex_backoff_initial_s: float = 1.0
    vertex_backoff_max_s: float = 30.0
    vertex_timeout_s: float = 120.0
    max_request_bytes: int = 8 * MIB
    job_ttl_s: int = 7 * 24 * 3600
    memory_max_jobs: int = 100_000
    cache_max_jobs: int = 10_000
    executor_concurrency: int = 0  # 0: no cap of its own, the regions' limits decide
    max_pending_jobs: int = 10_000
    lease_s: float = 60.0
    push_ack_deadline_s: float = 600.0
    max_delivery_attempts: int = 5
    requeue_delay_s: float = 10.0
    sweep_interval_s: float = 30.0
    publish_grace_s: float = 60.0
    region_cooldown_initial_s: float = 2.0
    region_cooldown_max_s: float = 60.0
    region_concurrency_initial: int = 16
    region_concurrency_min: int = 1
    region_concurrency_max: int = 1000
    region_wait_max_s: float = 30.0
    region_sync_s: float = 2.0
    sync_timeout_s: float = 300.0
    region_strategy: RegionStrategy = RegionStrategy.ADAPTIVE
    log_level: str = "INFO"
    log_payloads: bool = False
    push_audience: str | None = None
    push_service_account: str | None = None
    push_certs_url: str = GOOGLE_CERTS_URL
    api_keys: ApiKeyStore | None = None

    @property
    def mode(self) -> Mode:
        """The mode chosen by what is configured."""
        if self.pubsub_topic:
            return Mode.PUBSUB
        if self.firestore_collection:
            return Mode.FIRESTORE
        return Mode.MEMORY

    @property
    def model(self) -> ModelConfig:
        """The default model's configuration."""
        return self.models[self.model_id]

    @property
    def vertex_sends_credentials(self) -> bool:
        """Whether Vertex calls carry Google credentials (never to a plain-http endpoint)."""
        return not (self.vertex_api_endpoint or "").startswith("http://")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Parse and validate settings.

        Args:
            env: The environment, usually `os.environ`.

        Returns:
            The validated settings.

        Raises:
            ConfigError: naming the first variable that is missing or malformed.
        """
        reader = _Reader(env)
        project = reader.required("GOOGLE_CLOUD_PROJECT")
        model_id = reader.required("MODEL_ID")
        if not _MODEL.match(model_id):
            raise ConfigError("MODEL_ID", f"{model_id!r} is not a model id")
        models = _parse_model_config(reader.required("MODEL_CONFIG"))
        if model_id not in models:
            raise ConfigError(
                "MODEL_CONFIG",
                f"has no entry for MODEL_ID {model_id!r} (configured: {', '.join(models)})",
            )
        collection = reader.optional("FIRESTORE_COLLECTION")
        database = reader.optional("FIRESTORE_DATABASE")
        topic = reader.optional("PUBSUB_TOPIC")
        if collection is not None and not _COLLECTION.match(collection):
            raise ConfigError("FIRESTORE_COLLECTION", "must not contain '/'")
        if collection and not database:
            raise ConfigError(
                "FIRESTORE_DATABASE",
                "is required when FIRESTORE_COLLECTION is set (use '(default)' for the default)",
            )
        if topic and not collection:
            raise ConfigError(
                "PUBSUB_TOPIC",
                "needs FIRESTORE_COLLECTION too: the ingress and the worker share job state "
                "through Firestore",
            )
        if topic and not _TOPIC.match(topic):
            raise ConfigError("PUBSUB_TOPIC", f"{topic!r} is not a topic id")
        endpoint = reader.optional("VERTEX_API_ENDPOINT")
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError("VERTEX_API_ENDPOINT", f"{endpoint!r} is not an http(s) URL")
            endpoint = endpoint.rstrip("/")
        settings = cls(
            project=project,
            model_id=model_id,
            models=models,
            host=reader.optional("HOST") or "0.0.0.0",  # noqa: S104 - see the field
            port=reader.number("PORT", int, 8080, low=0, high=65535),
            firestore_collection=collection,
            firestore_database=database if collection else None,
            pubsub_topic=topic,
            vertex_api_endpoint=endpoint,
            vertex_max_retries=reader.number("VERTEX_MAX_RETRIES", int, 3, low=0, high=20),
            vertex_backoff_initial_s=reader.number(
                "VERTEX_BACKOFF_INITIAL_S", float, 1.0, low=0.0, high=600.0
            ),
            vertex_backoff_max_s=reader.number(
                "VERTEX_BACKOFF_MAX_S", float, 30.0, low=0.0, high=600.0
            ),
            vertex_timeout_s=reader.number("VERTEX_TIMEOUT_S", float, 120.0, low=0.1, high=3600),
            max_request_bytes=reader.number(
                "MAX_REQUEST_BYTES", int, 8 * MIB, low=1024, high=9 * MIB
            ),
            job_ttl_s=reader.number("JOB_TTL_S", int, 7 * 24 * 3600, low=60, high=10**9),
            memory_max_jobs=reader.number("MEMORY_MAX_JOBS", int, 100_000, low=1, high=10**8),
            cache_max_jobs=reader.number("CACHE_MAX_JOBS", int, 10_000, low=0, high=10**8),
            executor_concurrency=reader.number(
                "EXECUTOR_CONCURRENCY", int, 0, low=0, high=1_000_000
            ),
            max_pending_jobs=reader.number("MAX_PENDING_JOBS", int, 10_000, low=1, high=10**7),
            lease_s=reader.number("LEASE_S", float, 60.0, low=1.0, high=3600.0),
            push_ack_deadline_s=reader.number(
                "PUSH_ACK_DEADLINE_S", float, 600.0, low=10.0, high=600.0
            ),
            max_delivery_attempts=reader.number("MAX_DELIVERY_ATTEMPTS", int, 5, low=1, high=100),
            requeue_delay_s=reader.number("REQUEUE_DELAY_S", float, 10.0, low=0.0, high=600.0),
            sweep_interval_s=reader.number("SWEEP_INTERVAL_S", float, 30.0, low=0.1, high=3600),
            publish_grace_s=reader.number("PUBLISH_GRACE_S", float, 60.0, low=0.1, high=3600),
            region_cooldown_initial_s=reader.number(
                "REGION_COOLDOWN_INITIAL_S", float, 2.0, low=0.01, high=3600
            ),
            region_cooldown_max_s=reader.number(
                "REGION_COOLDOWN_MAX_S", float, 60.0, low=0.01, high=3600
            ),
            region_concurrency_initial=reader.number(
                "REGION_CONCURRENCY_INITIAL", int, 16, low=1, high=100_000
            ),
            region_concurrency_min=reader.number(
                "REGION_CONCURRENCY_MIN", int, 1, low=1, high=100_000
            ),
            region_concurrency_max=reader.number(
                "REGION_CONCURRENCY_MAX", int, 1000, low=1, high=100_000
            ),
            region_wait_max_s=reader.number("REGION_WAIT_MAX_S", float, 30.0, low=0.0, high=3600),
            region_sync_s=reader.number("REGION_SYNC_S", float, 2.0, low=0.0, high=3600),
            sync_timeout_s=reader.number("SYNC_TIMEOUT_S", float, 300.0, low=1.0, high=3600),
            region_strategy=RegionStrategy(
                reader.choice(
                    "REGION_STRATEGY",
                    tuple(RegionStrategy),
                    RegionStrategy.ADAPTIVE,
                    upper=False,
                )
            ),
            log_level=reader.choice(
                "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True
            ),
            log_payloads=reader.flag("LOG_PAYLOADS", default=False),
            push_audience=reader.optional("PUSH_AUDIENCE"),
            push_service_account=reader.optional("PUSH_SERVICE_ACCOUNT"),
            push_certs_url=_certs_url(reader.optional("PUSH_CERTS_URL")),
            api_keys=_api_keys(reader.optional("API_KEYS_FILE")),
        )
        settings.check_consistency()
        return settings

    def check_consistency(self) -> None:
        """Reject combinations that each look fine alone but cannot work together.

        Raises:
            ConfigError: naming the variable to change.
        """
        if self.vertex_backoff_max_s < self.vertex_backoff_initial_s:
            raise ConfigError("VERTEX_BACKOFF_MAX_S", "must not be below VERTEX_BACKOFF_INITIAL_S")
        if not (
            self.region_concurrency_min
            <= self.region_concurrency_initial
            <= self.region_concurrency_max
        ):
            raise ConfigError(
                "REGION_CONCURRENCY_INITIAL",
                "must lie between REGION_CONCURRENCY_MIN and REGION_CONCURRENCY_MAX",
            )
        if self.mode is Mode.MEMORY and self.max_pending_jobs > self.memory_max_jobs:
            raise ConfigError(
                "MAX_PENDING_JOBS",
                "must not exceed MEMORY_MAX_JOBS (unfinished jobs are never evicted)",
            )
        if self.region_cooldown_max_s < self.region_cooldown_initial_s:
            raise ConfigError(
                "REGION_COOLDOWN_MAX_S", "must not be below REGION_COOLDOWN_INITIAL_S"
            )
        if bool(self.push_audience) != bool(self.push_service_account):
            missing = "PUSH_SERVICE_ACCOUNT" if self.push_audience else "PUSH_AUDIENCE"
            raise ConfigError(
                missing, "PUSH_AUDIENCE and PUSH_SERVICE_ACCOUNT are set together or not at all"
            )
        if self.push_service_account is not None and not _EMAIL.match(self.push_service_account):
            raise ConfigError("PUSH_SERVICE_ACCOUNT", "is not a service account's email")


def _parse_model_config(raw: str) -> dict[str, ModelConfig]:
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError("MODEL_CONFIG", f"is not valid JSON ({exc.msg} at {exc.pos})") from None
    example = '[{"model_id": "gemini-2.5-flash", "supported_regions": ["us-central1"]}]'
    if not isinstance(entries, list) or not entries:
        raise ConfigError("MODEL_CONFIG", f"must be a non-empty JSON list like {example}")
    models: dict[str, ModelConfig] = {}
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ConfigError("MODEL_CONFIG", f"{where} is not an object like {example}")
        model_id = entry.get("model_id")
        regions = entry.get("supported_regions")
        if not isinstance(model_id, str) or not _MODEL.match(model_id):
            raise ConfigError("MODEL_CONFIG", f"{where} needs a string model_id")
        if (
            not isinstance(regions, list)
            or not regions
            or not all(isinstance(r, str) and _REGION.match(r) for r in regions)
        ):
            raise ConfigError(
                "MODEL_CONFIG",
                f"{where} ({model_id}) needs supported_regions: a non-empty list of region "
                "names such as 'us-central1' or 'global'",
            )
        if len(set(regions)) != len(regions):
            raise ConfigError("MODEL_CONFIG", f"{where} ({model_id}) lists a region twice")
        if model_id in models:
            raise ConfigError("MODEL_CONFIG", f"model {model_id!r} appears twice")
        models[model_id] = ModelConfig(model_id=model_id, regions=tuple(regions))
    return models


class _Reader:
    """Reads typed values from the environment, naming the variable on error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def optional(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def required(self, name: str) -> str:
        value = self.optional(name)
        if value is None:
            raise ConfigError(name, "is required but not set")
        return value

    def number(self, name: str, kind: Callable[[str], _T], default: _T, *, low: _T, high: _T) -> _T:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(name, f"{raw!r} is not {noun}") from None
        if not low <= value <= high:
            raise ConfigError(name, f"{raw} is outside {low}..{high}")
        return value

    def flag(self, name: str, *, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"{raw!r} is not a boolean (true/false)")

    def choice(self, name: str, options: tuple[str, ...], default: str, *, upper: bool) -> str:
        raw = self.optional(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw
        if value not in options:
            raise ConfigError(name, f"{raw!r} is not one of {', '.join(options)}")
        return value


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _certs_url(raw: str | None) -> str:
    """PUSH_CERTS_URL: https, or http on loopback only (tests' certificate server)."""
    if raw is None:
        return GOOGLE_CERTS_URL
    parts = urlsplit(raw)
    if parts.scheme == "https" and parts.netloc:
        return raw
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return raw
    raise ConfigError(
        "PUSH_CERTS_URL", f"{raw!r} must be an https URL (plain http only on loopback)"
    )


def _api_keys(path: str | None) -> ApiKeyStore | None:
    """API_KEYS_FILE: read once at start-up; None leaves API keys off."""
    return None if path is None else ApiKeyStore.load(path)
