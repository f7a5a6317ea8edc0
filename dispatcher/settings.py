"""Configuration, parsed once from the environment into a frozen object.

Each setting is declared once, as a field of `Settings`: its type and default are the
field's, its variable, parser (with its bounds) and one line of documentation are the
field's `Declaration`. Parsing (`Settings.from_env`), the error messages, the defaults
of the parts built from settings (`values_for`, `DEFAULTS`) and the README's settings
table (`readme_table`) all follow from these declarations.

Only the services' entry points call `Settings.from_env(os.environ)`; the core
receives the object. Every problem names the variable it comes from and says what is
allowed. This module imports nothing of the dispatcher but its errors.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dispatcher.errors import ConfigError

MIB = 1024 * 1024
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
_REGION = re.compile(r"^(global|[a-z]+-[a-z]+\d+)$")
_TOPIC = re.compile(r"^[A-Za-z][A-Za-z0-9._~%+-]{2,254}$")
_COLLECTION = re.compile(r"^[^/]{1,1500}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_MODEL_EXAMPLE = '[{"model_id": "gemini-2.5-flash", "supported_regions": ["us-central1"]}]'


class Mode(enum.StrEnum):
    """Where jobs are kept and who executes them."""

    MEMORY = "memory"  # one process: jobs in memory, executed in-process
    FIRESTORE = "firestore"  # jobs in Firestore, executed in-process by each ingress
    PUBSUB = "pubsub"  # jobs in Firestore, published to Pub/Sub, executed by the worker


class RegionStrategy(enum.StrEnum):
    """How calls are spread over regions (`REGION_STRATEGY`)."""

    ADAPTIVE = "adaptive"  # breakers, adaptive limits; a retry moves to the next healthy region
    NAIVE = "naive"  # no breaker, no limit; every call and retry goes to the assigned region


class Tier(enum.StrEnum):
    """How a job's calls are sold by Vertex (see `dispatcher.tiers` for what each sends)."""

    PROVISIONED = "provisioned"  # Provisioned Throughput only; 429 past it
    STANDARD = "standard"  # PT first where the model has it, else pay-as-you-go
    FLEX = "flex"  # Flex PayGo on `global`: about half price, slower, more throttling
    PRIORITY = "priority"  # Priority PayGo on `global`: premium, more reliable
    AUTO = "auto"  # flex while the deadline allows, then standard


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """One model and the regions that serve it, in round-robin order.

    Attributes:
        model_id: The Vertex model id.
        regions: The regions that serve it (`global` included where configured).
        provisioned_regions: The regions where the project holds Provisioned
            Throughput for it (a subset of `regions`).
        default_tier: The tier of a job that names none.
        fallbacks: Models to move a job to, in order, when this one is exhausted.
    """

    model_id: str
    regions: tuple[str, ...]
    provisioned_regions: tuple[str, ...] = ()
    default_tier: Tier = Tier.STANDARD
    fallbacks: tuple[str, ...] = ()


# --- Declarations -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Declaration:
    """How one setting is read from the environment and shown in the README.

    Attributes:
        env: The environment variable.
        doc: One line for the README's settings table.
        parse: Turns the variable's (stripped, non-empty) text into the value; raises
            `ValueError` with the problem, which becomes a `ConfigError` naming `env`.
        low: The smallest value allowed (numbers only).
        high: The largest value allowed (numbers only).
        shown: The README's default column, when the default's own text is not it.
        name: The `Settings` field (filled in from the field).
        default: The field's default (None when the setting is required).
        required: Whether the service refuses to start without it (the field has no default).
    """

    env: str
    doc: str
    parse: Callable[[str], Any]
    low: float | None = None
    high: float | None = None
    shown: str | None = None
    name: str = ""
    default: Any = None
    required: bool = True

    @property
    def allowed(self) -> str | None:
        """The range a number must lie in, as error messages show it (None: not a number)."""
        return None if self.low is None or self.high is None else _span(self.low, self.high)

    @property
    def shown_default(self) -> str:
        """The default as the README's settings table shows it."""
        if self.shown is not None:
            return self.shown
        if self.required:
            return "required"
        if self.default is None:
            return "unset"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


_DECLARATION = "declaration"


def _declare(
    env: str,
    doc: str,
    parse: Callable[[str], Any] = str,
    *,
    shown: str | None = None,
    low: float | None = None,
    high: float | None = None,
) -> dict[str, Declaration]:
    """A field's metadata declaring its setting."""
    return {
        _DECLARATION: Declaration(env=env, doc=doc, parse=parse, low=low, high=high, shown=shown)
    }


def _span(low: float, high: float) -> str:
    """A range as error messages show it: `0..20`, `0.1..3600`."""
    return f"{low:.10g}..{high:.10g}"


def _integer(env: str, doc: str, *, low: int, high: int, shown: str | None = None) -> Any:
    """An integer setting within low..high."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer (allowed: {_span(low, high)})") from None
        if not low <= value <= high:
            raise ValueError(f"{raw} is outside the allowed {_span(low, high)}")
        return value

    return _declare(env, doc, parse, shown=shown, low=low, high=high)


def _number(env: str, doc: str, *, low: float, high: float, shown: str | None = None) -> Any:
    """A number setting within low..high."""

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number (allowed: {_span(low, high)})") from None
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"{raw} is outside the allowed {_span(low, high)}")
        return value

    return _declare(env, doc, parse, shown=shown, low=low, high=high)


def _one_of(
    options: tuple[str, ...], *, upper: bool = False, convert: Callable[[str], Any] = str
) -> Callable[[str], Any]:
    """A parser accepting one of a few words (compared in upper case when `upper`)."""

    def parse(raw: str) -> Any:
        value = raw.upper() if upper else raw
        if value not in options:
            raise ValueError(f"{raw!r} is not one of {', '.join(options)}")
        return convert(value)

    return parse


def _matching(pattern: re.Pattern[str], problem: str) -> Callable[[str], str]:
    """A parser accepting text that matches `pattern`, refusing it with `problem`."""

    def parse(raw: str) -> str:
        if not pattern.match(raw):
            raise ValueError(problem.format(raw=raw))
        return raw

    return parse


def _http_url(raw: str) -> str:
    """VERTEX_API_ENDPOINT: an http(s) URL, kept without its trailing slash."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{raw!r} is not an http(s) URL")
    return raw.rstrip("/")


def _certs_url(raw: str) -> str:
    """PUSH_CERTS_URL: https, or http on loopback only (tests' certificate server)."""
    parts = urlsplit(raw)
    if parts.scheme == "https" and parts.netloc:
        return raw
    if parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return raw
    raise ValueError(f"{raw!r} must be an https URL (plain http only on loopback)")


def check_webhook_secret(raw: str) -> str:
    """A Standard Webhooks signing secret: `whsec_` and base64 of 24 to 64 bytes.

    Never quoted in the error: it is a secret.
    """
    encoded = raw.removeprefix("whsec_")
    try:
        secret = base64.b64decode(encoded, validate=True) if encoded != raw else b""
    except binascii.Error:
        secret = b""
    if not 24 <= len(secret) <= 64:
        raise ValueError(
            "is not whsec_ and the base64 of 24 to 64 random bytes "
            "(make one with: echo whsec_$(head -c 32 /dev/urandom | base64))"
        )
    return raw


def _host_list(raw: str) -> frozenset[str]:
    """WEBHOOK_ALLOW_HOSTS: comma-separated `host` or `host:port`, lower-cased."""
    hosts = frozenset(h.strip().lower() for h in raw.split(",") if h.strip())
    for host in hosts:
        name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if not name or (port and not port.isdigit()) or any(c in host for c in "/@ "):
            raise ValueError(f"{host!r} is not host or host:port")
    return hosts


def _model_config(raw: str) -> dict[str, ModelConfig]:
    """MODEL_CONFIG: a JSON list of models and their regions."""
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"must be a non-empty JSON list like {_MODEL_EXAMPLE}")
    models: dict[str, ModelConfig] = {}
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object like {_MODEL_EXAMPLE}")
        model_id = entry.get("model_id")
        regions = entry.get("supported_regions")
        if not isinstance(model_id, str) or not _MODEL.match(model_id):
            raise ValueError(f"{where} needs a string model_id")
        if (
            not isinstance(regions, list)
            or not regions
            or not all(isinstance(r, str) and _REGION.match(r) for r in regions)
        ):
            raise ValueError(
                f"{where} ({model_id}) needs supported_regions: a non-empty list of region "
                "names such as 'us-central1' or 'global'"
            )
        if len(set(regions)) != len(regions):
            raise ValueError(f"{where} ({model_id}) lists a region twice")
        if model_id in models:
            raise ValueError(f"model {model_id!r} appears twice")
        models[model_id] = _model_options(where, model_id, tuple(regions), entry)
    for model in models.values():
        unknown = [name for name in model.fallbacks if name not in models or name == model.model_id]
        if unknown:
            raise ValueError(
                f"model {model.model_id!r}: fallbacks {unknown} are not other configured models"
            )
    return models


def _model_options(
    where: str, model_id: str, regions: tuple[str, ...], entry: dict[str, Any]
) -> ModelConfig:
    """The optional keys of one MODEL_CONFIG entry: PT regions, default tier, fallbacks."""
    provisioned = entry.get("provisioned_regions", [])
    if not isinstance(provisioned, list) or not all(r in regions for r in provisioned):
        raise ValueError(
            f"{where} ({model_id}): provisioned_regions must be a list of its supported_regions"
        )
    tier = entry.get("default_tier", Tier.STANDARD.value)
    if tier not in {t.value for t in Tier}:
        raise ValueError(
            f"{where} ({model_id}): default_tier {tier!r} is not one of "
            f"{', '.join(t.value for t in Tier)}"
        )
    fallbacks = entry.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        raise ValueError(f"{where} ({model_id}): fallbacks must be a list of model ids")
    model = ModelConfig(
        model_id=model_id,
        regions=regions,
        provisioned_regions=tuple(provisioned),
        default_tier=Tier(tier),
        fallbacks=tuple(fallbacks),
    )
    for tier_needing_global in (Tier.FLEX, Tier.PRIORITY, Tier.AUTO):
        if model.default_tier is tier_needing_global and "global" not in regions:
            raise ValueError(
                f"{where} ({model_id}): default_tier {tier} needs the 'global' region "
                "(Flex and Priority PayGo are served on the global endpoint only)"
            )
    if model.default_tier is Tier.PROVISIONED and not provisioned:
        raise ValueError(
            f"{where} ({model_id}): default_tier provisioned needs provisioned_regions"
        )
    return model


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the services are told from outside, one declared setting a field."""

    project: str = field(
        metadata=_declare(
            "GOOGLE_CLOUD_PROJECT", "project of the Vertex endpoint, Firestore and Pub/Sub"
        )
    )
    model_id: str = field(
        metadata=_declare(
            "MODEL_ID",
            "default model for `POST /generate`",
            _matching(_MODEL, "{raw!r} is not a model id (up to 128 of A-Z a-z 0-9 . _ @ -)"),
        )
    )
    models: Mapping[str, ModelConfig] = field(
        metadata=_declare(
            "MODEL_CONFIG",
            'JSON `[{"model_id": "...", "supported_regions": ["us-central1", ...]}]`; '
            '`"global"` means `aiplatform.googleapis.com` with `locations/global`, any other '
            "region `{region}-aiplatform.googleapis.com`; optional per model: "
            '`"provisioned_regions"`, `"default_tier"`, `"fallbacks"` (see Tiers)',
            _model_config,
        )
    )
    firestore_collection: str | None = field(
        default=None,
        metadata=_declare(
            "FIRESTORE_COLLECTION",
            "collection of job records; enables mode 2",
            _matching(_COLLECTION, "must not contain '/'"),
        ),
    )
    firestore_database: str | None = field(
        default=None,
        metadata=_declare(
            "FIRESTORE_DATABASE",
            "database id; `(default)` is valid",
            shown="required with a collection",
        ),
    )
    pubsub_topic: str | None = field(
        default=None,
        metadata=_declare(
            "PUBSUB_TOPIC",
            "topic id in `GOOGLE_CLOUD_PROJECT`; enables mode 3 (needs Firestore)",
            _matching(_TOPIC, "{raw!r} is not a topic id"),
        ),
    )
    interactive_topic: str | None = field(
        default=None,
        metadata=_declare(
            "INTERACTIVE_TOPIC",
            "topic id in `GOOGLE_CLOUD_PROJECT` for the jobs of `priority=interactive` keys "
            "(mode 3), pushed to the worker by a subscription of its own so they never "
            "queue behind a batch backlog in `PUBSUB_TOPIC`'s; unset: one topic for all",
            _matching(_TOPIC, "{raw!r} is not a topic id"),
        ),
    )
    results_topic: str | None = field(
        default=None,
        metadata=_declare(
            "RESULTS_TOPIC",
            "topic id in `GOOGLE_CLOUD_PROJECT`: every job that becomes final publishes a "
            "completion event there (at least once; both services)",
            _matching(_TOPIC, "{raw!r} is not a topic id"),
        ),
    )
    results_event_result_bytes: int = field(
        default=0,
        metadata=_integer(
            "RESULTS_EVENT_RESULT_BYTES",
            "a completion event carries the response body when its JSON is at most this "
            "many bytes (0: never)",
            low=0,
            high=9_000_000,
        ),
    )
    webhook_secret: str | None = field(
        default=None,
        repr=False,  # a secret
        metadata=_declare(
            "WEBHOOK_SECRET",
            "worker: `whsec_...` (Standard Webhooks), signs the webhooks of jobs whose API "
            "key has no `webhook_secret` of its own (none: such webhooks are undeliverable)",
            check_webhook_secret,
        ),
    )
    webhook_allow_hosts: frozenset[str] = field(
        default=frozenset(),
        metadata=_declare(
            "WEBHOOK_ALLOW_HOSTS",
            "comma-separated `host` or `host:port` that webhooks may reach although they are "
            "not public addresses (plain http allowed too); every other host must be https "
            "and resolve to public addresses only",
            _host_list,
            shown="none",
        ),
    )
    webhook_delivery_max_s: float = field(
        # Under what the webhook subscription's 100 attempts (10 s..600 s apart) reach.
        default=21600.0,
        metadata=_number(
            "WEBHOOK_DELIVERY_MAX_S",
            "how long after a job finished its webhook is retried before it is recorded "
            "undeliverable",
            low=1.0,
            high=7 * 86400.0,
            shown="21600 (6 h)",
        ),
    )
    webhook_timeout_s: float = field(
        default=10.0,
        metadata=_number(
            "WEBHOOK_TIMEOUT_S",
            "timeout of one webhook POST (keep it below the webhook subscription's ack "
            "deadline, 60 s from `infra/deploy.sh`)",
            low=0.1,
            high=300.0,
        ),
    )
    vertex_api_endpoint: str | None = field(
        default=None,
        metadata=_declare(
            "VERTEX_API_ENDPOINT",
            "base URL replacing every regional host (path unchanged); an `http://` endpoint "
            "is never sent Google credentials",
            _http_url,
        ),
    )
    vertex_max_retries: int = field(
        default=3,
        metadata=_integer(
            "VERTEX_MAX_RETRIES",
            "retries of transient failures within one execution (so at most 4 calls)",
            low=0,
            high=20,
        ),
    )
    vertex_backoff_initial_s: float = field(
        default=1.0,
        metadata=_number(
            "VERTEX_BACKOFF_INITIAL_S",
            "first delay of the exponential backoff (with jitter) when a retry must return to "
            "a region already tried",
            low=0.0,
            high=600.0,
        ),
    )
    vertex_backoff_max_s: float = field(
        default=30.0,
        metadata=_number(
            "VERTEX_BACKOFF_MAX_S",
            "largest delay of that backoff",
            low=0.0,
            high=600.0,
        ),
    )
    vertex_timeout_s: float = field(
        default=120.0,
        metadata=_number("VERTEX_TIMEOUT_S", "timeout of one Vertex call", low=0.1, high=3600.0),
    )
    max_request_bytes: int = field(
        default=8 * MIB,
        metadata=_integer(
            "MAX_REQUEST_BYTES",
            "largest accepted body (under Pub/Sub's and Firestore's limits)",
            low=1024,
            high=9 * MIB,
            shown="8 MiB",
        ),
    )
    job_ttl_s: int = field(
        default=7 * 24 * 3600,
        metadata=_integer(
            "JOB_TTL_S",
            "records carry `expire_at` = creation + this; memory mode evicts after it",
            low=60,
            high=10**9,
            shown="604800 (7 days)",
        ),
    )
    memory_max_jobs: int = field(
        default=100_000,
        metadata=_integer(
            "MEMORY_MAX_JOBS",
            "mode 1: finished records kept at most (oldest evicted first)",
            low=1,
            high=10**8,
        ),
    )
    cache_max_jobs: int = field(
        default=10_000,
        metadata=_integer(
            "CACHE_MAX_JOBS",
            "modes 2-3: finished records cached by each ingress",
            low=0,
            high=10**8,
        ),
    )
    executor_concurrency: int = field(
        default=0,
        metadata=_integer(
            "EXECUTOR_CONCURRENCY",
            "modes 1-2: an optional hard cap on jobs executed at once per ingress. Unset, the "
            "regions decide: a queued job starts while fewer than max(8, capacity / 8) runs "
            "are without a region slot, so the calls in flight follow the sum of the regions' "
            "adaptive limits (see [How concurrency is bounded](#how-concurrency-is-bounded))",
            low=0,
            high=1_000_000,
            shown="0 (none)",
        ),
    )
    max_pending_jobs: int = field(
        default=10_000,
        metadata=_integer(
            "MAX_PENDING_JOBS",
            "modes 1-2: unfinished jobs admitted per ingress before `429`",
            low=1,
            high=10**7,
        ),
    )
    lease_s: float = field(
        default=60.0,
        metadata=_number(
            "LEASE_S",
            "how long an execution holds a job without renewal (renewed every third)",
            low=1.0,
            high=3600.0,
        ),
    )
    push_ack_deadline_s: float = field(
        default=600.0,
        metadata=_number(
            "PUSH_ACK_DEADLINE_S",
            "the push subscription's ack deadline; one execution's retries end within 80 % of it",
            low=10.0,
            high=600.0,
        ),
    )
    max_delivery_attempts: int = field(
        default=5,
        metadata=_integer(
            "MAX_DELIVERY_ATTEMPTS",
            "executions of one job before a transient failure is final (Pub/Sub's "
            "`deliveryAttempt` or the record's own count)",
            low=1,
            high=100,
        ),
    )
    requeue_delay_s: float = field(
        default=10.0,
        metadata=_number(
            "REQUEUE_DELAY_S",
            "modes 1-2: delay before a job whose retries ran out runs again",
            low=0.0,
            high=600.0,
        ),
    )
    sweep_interval_s: float = field(
        default=30.0,
        metadata=_number(
            "SWEEP_INTERVAL_S",
            "how often stranded jobs are looked for",
            low=0.1,
            high=3600.0,
        ),
    )
    publish_grace_s: float = field(
        default=60.0,
        metadata=_number(
            "PUBLISH_GRACE_S",
            "how long a job may sit unmoved before it counts as stranded",
            low=0.1,
            high=3600.0,
        ),
    )
    region_cooldown_initial_s: float = field(
        default=2.0,
        metadata=_number(
            "REGION_COOLDOWN_INITIAL_S",
            "a failing region's first cooldown, doubling while it keeps failing",
            low=0.01,
            high=3600.0,
        ),
    )
    region_cooldown_max_s: float = field(
        default=60.0,
        metadata=_number(
            "REGION_COOLDOWN_MAX_S",
            "the longest cooldown of a failing region",
            low=0.01,
            high=3600.0,
        ),
    )
    region_concurrency_initial: int = field(
        default=16,
        metadata=_integer(
            "REGION_CONCURRENCY_INITIAL",
            "per-region limit of calls in flight at first, adapted to what the region accepts "
            "(the naive strategy holds it fixed)",
            low=1,
            high=100_000,
        ),
    )
    region_concurrency_min: int = field(
        default=1,
        metadata=_integer(
            "REGION_CONCURRENCY_MIN",
            "lowest a region's adapted limit goes",
            low=1,
            high=100_000,
        ),
    )
    region_concurrency_max: int = field(
        default=1000,
        metadata=_integer(
            "REGION_CONCURRENCY_MAX",
            "highest a region's adapted limit goes",
            low=1,
            high=100_000,
        ),
    )
    region_wait_max_s: float = field(
        default=30.0,
        metadata=_number(
            "REGION_WAIT_MAX_S",
            "how long a call waits while every allowed region's breaker is open before "
            "probing one anyway (a healthy but full region is waited for)",
            low=0.0,
            high=3600.0,
        ),
    )
    region_sync_s: float = field(
        default=2.0,
        metadata=_number(
            "REGION_SYNC_S",
            "modes 2-3: how often each instance shares region health and learnt capacity "
            "through Firestore (`{FIRESTORE_COLLECTION}_regions`, `_instances`); 0 turns "
            "sharing off",
            low=0.0,
            high=3600.0,
        ),
    )
    region_strategy: RegionStrategy = field(
        default=RegionStrategy.ADAPTIVE,
        metadata=_declare(
            "REGION_STRATEGY",
            "`adaptive`: all of the above; `naive`: the original example's behaviour (no "
            "breaker, a fixed `REGION_CONCURRENCY_INITIAL` per region, every retry in the "
            "job's own region after backoff), only as the baseline of the "
            "[benchmarks](BENCHMARKS.md)",
            _one_of(tuple(RegionStrategy), convert=RegionStrategy),
        ),
    )
    sync_timeout_s: float = field(
        default=300.0,
        metadata=_number(
            "SYNC_TIMEOUT_S",
            "how long the Vertex-compatible route waits for its job before answering 504",
            low=1.0,
            high=3600.0,
        ),
    )
    push_audience: str | None = field(
        default=None,
        metadata=_declare(
            "PUSH_AUDIENCE",
            "worker: the OIDC audience every push must carry (set with "
            "`PUSH_SERVICE_ACCOUNT` or not at all; see [Security](#security))",
        ),
    )
    push_service_account: str | None = field(
        default=None,
        metadata=_declare(
            "PUSH_SERVICE_ACCOUNT",
            "worker: the account every push must be signed as (set with `PUSH_AUDIENCE`)",
            _matching(_EMAIL, "is not a service account's email"),
        ),
    )
    push_certs_url: str = field(
        default=GOOGLE_CERTS_URL,
        metadata=_declare(
            "PUSH_CERTS_URL",
            "worker: where the token-signing certificates come from",
            _certs_url,
            shown="Google's v1 certs",
        ),
    )
    api_keys_file: str | None = field(
        default=None,
        metadata=_declare(
            "API_KEYS_FILE",
            "ingress: `name:sha256hex` lines (each may add its key's policy words), read at "
            "start-up and again when it changes or on SIGHUP; turns on API keys, per-caller "
            "job isolation and key policies",
        ),
    )
    price_table_file: str | None = field(
        default=None,
        metadata=_declare(
            "PRICE_TABLE_FILE",
            "JSON prices per model and rate (USD per million tokens), read at start-up; "
            "turns on `dispatcher_cost_usd_total` (see Tiers)",
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=_declare("LOG_LEVEL", ", ".join(_LOG_LEVELS), _one_of(_LOG_LEVELS, upper=True)),
    )
    host: str = field(
        default="0.0.0.0",  # noqa: S104 - a Cloud Run container must listen on every interface
        metadata=_declare("HOST", "address each service listens on"),
    )
    port: int = field(
        default=8080,
        metadata=_integer("PORT", "port each service listens on", low=0, high=65535),
    )

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
        """Parse and validate settings; an empty variable counts as unset.

        Args:
            env: The environment, usually `os.environ`.

        Returns:
            The validated settings.

        Raises:
            ConfigError: naming the first variable that is missing or malformed.
        """
        values: dict[str, Any] = {}
        for declared in DECLARED:
            raw = env.get(declared.env, "").strip()
            if not raw:
                if declared.required:
                    raise ConfigError(declared.env, "is required but not set")
                continue
            try:
                values[declared.name] = declared.parse(raw)
            except ValueError as exc:
                raise ConfigError(declared.env, str(exc)) from None
        settings = cls(**values)
        settings.check_consistency()
        return settings

    def check_consistency(self) -> None:
        """Reject combinations that each look fine alone but cannot work together.

        Raises:
            ConfigError: naming the variable to change.
        """
        if self.model_id not in self.models:
            raise ConfigError(
                "MODEL_CONFIG",
                f"has no entry for MODEL_ID {self.model_id!r} "
                f"(configured: {', '.join(self.models)})",
            )
        if self.firestore_collection and not self.firestore_database:
            raise ConfigError(
                "FIRESTORE_DATABASE",
                "is required when FIRESTORE_COLLECTION is set (use '(default)' for the default)",
            )
        if self.pubsub_topic and not self.firestore_collection:
            raise ConfigError(
                "PUBSUB_TOPIC",
                "needs FIRESTORE_COLLECTION too: the ingress and the worker share job state "
                "through Firestore",
            )
        if self.interactive_topic and not self.pubsub_topic:
            raise ConfigError(
                "INTERACTIVE_TOPIC", "needs PUBSUB_TOPIC too: it splits mode 3's job topic"
            )
        if self.interactive_topic and self.interactive_topic == self.pubsub_topic:
            raise ConfigError(
                "INTERACTIVE_TOPIC",
                "must differ from PUBSUB_TOPIC: its point is a subscription of its own",
            )
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

    def values_for(self, target: type[Any], *, prefix: str = "") -> dict[str, Any]:
        """The settings a dataclass is built from, by name: its field `x` is `prefix + x`.

        Fields without such a setting are left out (to their defaults, or to the caller).

        Args:
            target: A dataclass, such as `regions.PoolConfig`.
            prefix: What the settings' names add to the dataclass's.
        """
        return {
            f.name: getattr(self, prefix + f.name)
            for f in dataclasses.fields(target)
            if prefix + f.name in _NAMES
        }


# Every setting, in the order of the fields (and of the README's table).
DECLARED: tuple[Declaration, ...] = tuple(
    dataclasses.replace(
        f.metadata[_DECLARATION],
        name=f.name,
        default=None if f.default is dataclasses.MISSING else f.default,
        required=f.default is dataclasses.MISSING,
    )
    for f in dataclasses.fields(Settings)
)
# The declared defaults by field name, for the parts whose own defaults must not drift.
DEFAULTS: Mapping[str, Any] = {d.name: d.default for d in DECLARED if not d.required}
_NAMES = frozenset(d.name for d in DECLARED)

README_TABLE_HEAD = ("| variable | default | meaning |", "|---|---|---|")


def readme_table() -> str:
    """The README's settings table, one row per declared setting."""
    rows = [f"| `{d.env}` | {d.shown_default} | {d.doc} |" for d in DECLARED]
    return "\n".join([*README_TABLE_HEAD, *rows])
