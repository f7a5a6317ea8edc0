"""A development stand-in for Vertex AI's ``generateContent`` REST API. It is not Vertex.

It answers the request and response shapes of
``POST /{v1|v1beta1}/projects/P/locations/REGION/publishers/google/models/MODEL:generateContent``
on loopback, so integration tests, the local stack and benchmarks can exercise the
dispatcher without Google credentials, quota or cost. The dispatcher points at it by
setting ``VERTEX_API_ENDPOINT``; every region then reaches the same process, and the
``location`` path segment tells the stand-in which region was meant.

Each region's behaviour (latency, in-flight capacity, rate, a fixed status, a script of
statuses, response size) is set at start-up and can be changed while running through a
small control API under ``/_standin/``. Replies are deterministic
(``"stand-in reply from REGION: FIRST_USER_TEXT"``), so a test can tell which region
served which job.

Consumption tiers, as Vertex has them (the keys are optional; without them a region is
one pay-as-you-go pool, as before):

- ``provisioned_capacity`` (calls in flight the region's Provisioned Throughput holds;
  null or 0: no PT there) and ``provisioned_latency_s`` (default: the region's
  ``latency_s``). PT always answers 200; ``status`` and ``script`` belong to the
  pay-as-you-go pool. The ``X-Vertex-AI-LLM-Request-Type`` header chooses: ``dedicated``
  uses PT only (429 past it), ``shared`` skips PT, and without it PT is used while it has
  room and the overage spills to pay-as-you-go.
- ``flex`` and ``priority``, under ``regions.global`` only: each a nested pool with the
  pay-as-you-go keys (``latency_s``, ``capacity``, ``rate_per_s``, ``status``, ``script``,
  ``response_bytes``), serving ``X-Vertex-AI-LLM-Shared-Request-Type: flex`` (Flex PayGo)
  or ``priority`` (Priority PayGo) once PT is used or skipped. Without its pool such a
  call is served by ``global``'s own pay-as-you-go pool, still marked as flex or priority.
  Flex or priority sent to any other location answers 400, as Vertex serves them on the
  global endpoint only. Any other header value answers 400 too.

For example::

    {"regions": {
        "us-central1": {"latency_s": 0.2, "provisioned_capacity": 4},
        "global": {"latency_s": 0.2, "flex": {"capacity": 50, "latency_s": 2.0},
                   "priority": {"capacity": 20}}}}

Every 200 carries ``usageMetadata`` with ``promptTokenCount`` = ceil(characters of every
text part of ``contents`` and ``systemInstruction`` / 4), at least 1,
``candidatesTokenCount`` the same of the reply text, their sum as ``totalTokenCount``, and
``trafficType``: ``PROVISIONED_THROUGHPUT``, ``ON_DEMAND``, ``ON_DEMAND_FLEX`` or
``ON_DEMAND_PRIORITY``. The call log (``GET /_standin/calls``) records each call's two
headers (null when absent) and its ``traffic_type`` (null unless it succeeded); the stats
(``GET /_standin/stats``) count successes and tokens per traffic type, per region and in
total.

Shapes follow https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/inference
and Google's error model (https://cloud.google.com/apis/design/errors); the tiers follow
https://cloud.google.com/vertex-ai/generative-ai/docs/use-provisioned-throughput,
https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo and
https://cloud.google.com/vertex-ai/generative-ai/docs/priority-paygo.

Run it with::

    python -m dispatcher_devtools.vertex_standin --host 127.0.0.1 --port 8090 \\
        --config '{"default": {"latency_s": 0.05}, "regions": {"europe-west4": {"status": 503}}}'
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import hashlib
import json
import math
import os
import random
import secrets
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dispatcher.errors import ConfigError
from dispatcher.status import status_name

CONFIG_ENV: Final = "VERTEX_STANDIN_CONFIG"
API_VERSIONS: Final = frozenset({"v1", "v1beta1"})
CALL_LOG_LIMIT: Final = 200_000
CLIENT_CLOSED: Final = 499
"""Recorded (never sent) for a call whose client went away during its latency."""

# The error statuses the stand-in may be told to answer (those Vertex answers), each
# with its google.rpc.Code name from the services' one table.
# https://cloud.google.com/apis/design/errors#handling_errors
GOOGLE_STATUS: Final[Mapping[int, str]] = MappingProxyType(
    {code: status_name(code) for code in (400, 401, 403, 404, 429, 500, 502, 503, 504)}
)
_ALLOWED_STATUSES: Final = frozenset({200, *GOOGLE_STATUS})

_MESSAGES: Final[Mapping[int, str]] = MappingProxyType(
    {
        400: "Request contains an invalid argument.",
        401: "Request had invalid authentication credentials.",
        403: "Permission denied on resource project.",
        404: "Publisher model not found.",
        429: "Resource exhausted, please try again later. Please refer to "
        "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details.",
        500: "Internal error encountered.",
        502: "Bad gateway.",
        503: "The service is currently unavailable.",
        504: "The request timed out. Please try again.",
    }
)

_JSON_HEADERS: Final = {"content-type": "application/json; charset=UTF-8"}

# The methods (the part of the path after "MODEL:") the stand-in answers.
GENERATE_CONTENT: Final = "generateContent"
STREAM_GENERATE_CONTENT: Final = "streamGenerateContent"
COUNT_TOKENS: Final = "countTokens"
COMPUTE_TOKENS: Final = "computeTokens"
PREDICT: Final = "predict"
"""Text embeddings of ``text-embedding-*`` models (and what google-genai uses for them)."""
EMBED_CONTENT: Final = "embedContent"
"""One embedding of a Gemini embedding model (google-genai, one content)."""
BATCH_EMBED_CONTENTS: Final = "batchEmbedContents"
"""Several embeddings of a Gemini embedding model (google-genai, several contents)."""

DEFAULT_EMBEDDING_DIMENSION: Final = 768
"""Values per embedding when the request names no ``outputDimensionality``."""
# Models whose default (and largest) dimension is not DEFAULT_EMBEDDING_DIMENSION.
# https://cloud.google.com/vertex-ai/generative-ai/docs/embeddings/get-text-embeddings
_EMBEDDING_DIMENSIONS: Final[Mapping[str, int]] = MappingProxyType({"gemini-embedding-001": 3072})

GLOBAL_LOCATION: Final = "global"
"""The one location that serves Flex and Priority PayGo."""
REQUEST_TYPE_HEADER: Final = "X-Vertex-AI-LLM-Request-Type"
"""``dedicated`` (Provisioned Throughput only) or ``shared`` (pay-as-you-go only)."""
SHARED_REQUEST_TYPE_HEADER: Final = "X-Vertex-AI-LLM-Shared-Request-Type"
"""``flex`` (Flex PayGo) or ``priority`` (Priority PayGo)."""
DEDICATED: Final = "dedicated"
SHARED: Final = "shared"
FLEX: Final = "flex"
PRIORITY: Final = "priority"

# usageMetadata.trafficType values.
PROVISIONED_THROUGHPUT: Final = "PROVISIONED_THROUGHPUT"
ON_DEMAND: Final = "ON_DEMAND"
ON_DEMAND_FLEX: Final = "ON_DEMAND_FLEX"
ON_DEMAND_PRIORITY: Final = "ON_DEMAND_PRIORITY"

_PAYGO_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {FLEX: "Flex PayGo", PRIORITY: "Priority PayGo"}
)
# Vertex's message when PT is exceeded (the 429 table in
# https://cloud.google.com/vertex-ai/generative-ai/docs/provisioned-throughput/error-code-429).
_PT_EXHAUSTED: Final = "Too many requests. Exceeded the Provisioned Throughput."
# The fields a flex or priority pool takes: those of the pay-as-you-go pool.
_POOL_FIELDS: Final = ("latency_s", "capacity", "rate_per_s", "status", "script", "response_bytes")


def _number(value: object, where: str) -> float:
    # bool is an int subclass; `true` as a latency is a mistake, not 1 second.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(where, f"must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ConfigError(where, f"must be finite, not {value!r}")
    return float(value)


def _integer(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(where, f"must be an integer, not {value!r}")
    return value


def _status(value: object, where: str) -> int:
    status = _integer(value, where)
    if status not in _ALLOWED_STATUSES:
        raise ConfigError(where, f"must be one of {sorted(_ALLOWED_STATUSES)}, not {status}")
    return status


def _validated(name: str, value: object, where: str) -> Any:
    """Check one `RegionBehaviour` field and return it in its stored type.

    Raises:
        ConfigError: Naming ``where`` and what is wrong.
    """
    if name == "latency_s":
        latency = _number(value, where)
        if latency < 0:
            raise ConfigError(where, "must be >= 0")
        return latency
    if name == "capacity":
        if value is None:
            return None
        capacity = _integer(value, where)
        if capacity < 0:
            raise ConfigError(where, "must be >= 0 (0 rejects every call) or null")
        return capacity
    if name == "rate_per_s":
        if value is None:
            return None
        rate = _number(value, where)
        if rate <= 0:
            raise ConfigError(where, "must be > 0 or null")
        return rate
    if name == "status":
        return _status(value, where)
    if name == "script":
        if not isinstance(value, list | tuple):
            raise ConfigError(where, "must be a list of HTTP statuses")
        return tuple(_status(item, f"{where}[{i}]") for i, item in enumerate(value))
    if name == "response_bytes":
        size = _integer(value, where)
        if size < 0:
            raise ConfigError(where, "must be >= 0")
        return size
    if name == "provisioned_capacity":
        if value is None:
            return None
        capacity = _integer(value, where)
        if capacity < 0:
            raise ConfigError(where, "must be >= 0 (0 or null: no Provisioned Throughput)")
        return capacity
    if name == "provisioned_latency_s":
        if value is None:
            return None
        latency = _number(value, where)
        if latency < 0:
            raise ConfigError(where, "must be >= 0 or null (null: the region's latency_s)")
        return latency
    if name == "stream_chunks":
        chunks = _integer(value, where)
        if chunks < 1:
            raise ConfigError(where, "must be >= 1")
        return chunks
    if name == "chunk_delay_s":
        delay = _number(value, where)
        if delay < 0:
            raise ConfigError(where, "must be >= 0")
        return delay
    if name == "stream_fail_after":
        if value is None:
            return None
        after = _integer(value, where)
        if after < 0:
            raise ConfigError(where, "must be >= 0 (0: break before the first chunk) or null")
        return after
    if name in _PAYGO_NAMES:
        if value is None:
            return None
        if not isinstance(value, RegionBehaviour):
            raise ConfigError(where, "must be a pool (a JSON object of pool fields) or null")
        if value.has_tiers():
            raise ConfigError(where, f"is a pool: it takes only {list(_POOL_FIELDS)}")
        return value
    raise ConfigError(where, "is not a behaviour field")


@dataclass(frozen=True, kw_only=True, slots=True)
class RegionBehaviour:
    """How the stand-in answers calls for one region.

    Each region keeps its own counters, bucket and script, also when several regions
    share the default behaviour.

    Attributes:
        latency_s: Seconds to wait before answering (any status but the immediate 429s
            below). The wait ends early if the client disconnects.
        capacity: Most calls in flight at once; one more is answered 429 at once, like a
            region whose Dynamic Shared Quota is full. None means unlimited.
        rate_per_s: Token-bucket rate (burst ``max(1, rate)``); calls beyond it get 429 at
            once. None means unlimited.
        status: The status of every call once the script is used up (200 or an error).
        script: Statuses for the next calls, in order, before ``status`` applies.
        response_bytes: Pad successful bodies with "x" to at least this many bytes.
        provisioned_capacity: Calls in flight the region's Provisioned Throughput holds,
            apart from the pay-as-you-go pool above (whose fields are the ones before);
            PT answers 200. None or 0 means no PT in the region.
        provisioned_latency_s: The latency of calls PT serves; None means ``latency_s``.
        flex: The Flex PayGo pool (``global`` only): a behaviour with only the
            pay-as-you-go fields. None means flex calls use the pay-as-you-go pool.
        priority: The Priority PayGo pool, like ``flex``.
        stream_chunks: The number of chunks a ``streamGenerateContent`` reply is split
            into (fewer if the reply has fewer characters), whichever pool serves it.
        chunk_delay_s: Seconds between two chunks of a stream (the first one follows the
            pool's latency).
        stream_fail_after: Break every stream of the region after this many chunks: the
            connection is dropped without the rest, as when an upstream stream breaks.
            None means streams run to their end.
    """

    latency_s: float = 0.0
    capacity: int | None = None
    rate_per_s: float | None = None
    status: int = 200
    script: tuple[int, ...] = ()
    response_bytes: int = 0
    provisioned_capacity: int | None = None
    provisioned_latency_s: float | None = None
    flex: RegionBehaviour | None = None
    priority: RegionBehaviour | None = None
    stream_chunks: int = 4
    chunk_delay_s: float = 0.0
    stream_fail_after: int | None = None

    def __post_init__(self) -> None:
        # Validate Python-built behaviours as strictly as JSON ones, and normalise
        # (an int latency becomes a float, a script list a tuple).
        for f in dataclasses.fields(self):
            value = _validated(f.name, getattr(self, f.name), f"behaviour.{f.name}")
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_doc(
        cls, doc: object, *, base: RegionBehaviour | None = None, where: str = "behaviour"
    ) -> RegionBehaviour:
        """Build a behaviour from its JSON form, merged over ``base``.

        Args:
            doc: A JSON object whose keys are a subset of this class's fields;
                ``flex`` and ``priority`` are nested objects of pool fields, or null.
            base: The behaviour whose fields are kept where ``doc`` is silent
                (the class defaults when None).
            where: Where ``doc`` sits in the config, for error messages.

        Returns:
            The merged behaviour.

        Raises:
            ConfigError: A key is unknown or a value has the wrong type or range.
        """
        return cls._from_doc(doc, base, where, known={f.name for f in dataclasses.fields(cls)})

    @classmethod
    def _from_doc(
        cls, doc: object, base: RegionBehaviour | None, where: str, *, known: set[str]
    ) -> RegionBehaviour:
        if not isinstance(doc, dict):
            raise ConfigError(where, "must be a JSON object")
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(where, f"unknown field(s) {unknown}; known: {sorted(known)}")
        changes = {}
        for name, value in doc.items():
            if name in _PAYGO_NAMES and value is not None:
                # A nested pool merges over the base's pool, so PATCH {"flex": {...}} only
                # changes the named fields of the flex pool.
                value = cls._from_doc(
                    value,
                    getattr(base, name) if base else None,
                    f"{where}.{name}",
                    known=set(_POOL_FIELDS),
                )
            changes[name] = _validated(name, value, f"{where}.{name}")
        return dataclasses.replace(base or cls(), **changes)

    def has_tiers(self) -> bool:
        """Say whether this behaviour has PT, a flex or a priority pool of its own."""
        tiers = (self.provisioned_capacity, self.provisioned_latency_s, self.flex, self.priority)
        return tiers != (None, None, None, None)

    def to_doc(self) -> dict[str, Any]:
        """Return the JSON form accepted by `from_doc`."""
        return {
            **self._pool_doc(),
            "provisioned_capacity": self.provisioned_capacity,
            "provisioned_latency_s": self.provisioned_latency_s,
            "flex": None if self.flex is None else self.flex._pool_doc(),
            "priority": None if self.priority is None else self.priority._pool_doc(),
            "stream_chunks": self.stream_chunks,
            "chunk_delay_s": self.chunk_delay_s,
            "stream_fail_after": self.stream_fail_after,
        }

    def _pool_doc(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "capacity": self.capacity,
            "rate_per_s": self.rate_per_s,
            "status": self.status,
            "script": list(self.script),
            "response_bytes": self.response_bytes,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class StandinConfig:
    """Behaviour per region; ``default`` applies to every region not in ``regions``.

    A listed region's behaviour is complete on its own: it does not inherit from
    ``default``. Only ``regions["global"]`` may have ``flex`` and ``priority`` pools.
    """

    default: RegionBehaviour = RegionBehaviour()
    regions: Mapping[str, RegionBehaviour] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only copy keeps the frozen config frozen even if the caller's dict changes.
        object.__setattr__(self, "regions", MappingProxyType(dict(self.regions)))
        placed = [("default", self.default)]
        placed += [
            (f"regions.{name}", b) for name, b in self.regions.items() if name != GLOBAL_LOCATION
        ]
        for where, behaviour in placed:
            for tier in _PAYGO_NAMES:
                if getattr(behaviour, tier) is not None:
                    raise ConfigError(
                        f"{where}.{tier}",
                        f"{_PAYGO_NAMES[tier]} is served on the global endpoint only: "
                        f"set it under regions.{GLOBAL_LOCATION}",
                    )

    def behaviour_for(self, region: str) -> RegionBehaviour:
        """Return the behaviour for ``region``, or the default one."""
        return self.regions.get(region, self.default)

    def with_region(self, region: str, behaviour: RegionBehaviour) -> StandinConfig:
        """Return a copy of this config with ``region`` set to ``behaviour``."""
        return StandinConfig(default=self.default, regions={**self.regions, region: behaviour})

    @classmethod
    def from_doc(cls, doc: object) -> StandinConfig:
        """Build a config from ``{"default": {...}, "regions": {"REGION": {...}}}``.

        Args:
            doc: The decoded JSON; both keys are optional.

        Returns:
            The config.

        Raises:
            ConfigError: The document is malformed; the message names the field.
        """
        if not isinstance(doc, dict):
            raise ConfigError("config", "must be a JSON object")
        unknown = sorted(set(doc) - {"default", "regions"})
        if unknown:
            raise ConfigError(
                "config", f"unknown field(s) {unknown}; known: ['default', 'regions']"
            )
        default = RegionBehaviour.from_doc(doc.get("default", {}), where="default")
        regions_doc = doc.get("regions", {})
        if not isinstance(regions_doc, dict):
            raise ConfigError("regions", "must be a JSON object of region name to behaviour")
        regions = {
            name: RegionBehaviour.from_doc(behaviour, where=f"regions.{name}")
            for name, behaviour in regions_doc.items()
        }
        return cls(default=default, regions=regions)

    @classmethod
    def from_json(cls, text: str) -> StandinConfig:
        """Parse a config from JSON text (see `from_doc`).

        Raises:
            ConfigError: The text is not JSON or the document is malformed.
        """
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError("config", f"is not valid JSON ({exc})") from exc
        return cls.from_doc(doc)

    def to_doc(self) -> dict[str, Any]:
        """Return the JSON form accepted by `from_doc`."""
        return {
            "default": self.default.to_doc(),
            "regions": {name: b.to_doc() for name, b in self.regions.items()},
        }


class _PoolState:
    """One pool's live state: calls in flight, what is left of its script, its token bucket."""

    __slots__ = ("in_flight", "last_refill", "script", "tokens")

    def __init__(self, behaviour: RegionBehaviour | None, now: float) -> None:
        self.in_flight = 0
        self.restart(behaviour, now)

    def restart(self, behaviour: RegionBehaviour | None, now: float) -> None:
        """Start the script from its first status and refill the token bucket."""
        self.script = collections.deque(behaviour.script if behaviour else ())
        # A full bucket, like a region that has been idle.
        self.tokens = max(1.0, (behaviour.rate_per_s if behaviour else None) or 0.0)
        self.last_refill = now

    def take_token(self, rate: float, now: float) -> bool:
        burst = max(1.0, rate)
        self.tokens = min(burst, self.tokens + (now - self.last_refill) * rate)
        self.last_refill = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _RegionState:
    """What the stand-in tracks for one region: live counters and its pools' state."""

    __slots__ = (
        "behaviour",
        "by_status",
        "by_traffic_type",
        "calls",
        "candidates_tokens",
        "flex",
        "in_flight",
        "max_in_flight",
        "priority",
        "prompt_tokens",
        "provisioned",
        "shared",
    )

    def __init__(self, behaviour: RegionBehaviour, now: float) -> None:
        self.in_flight = 0  # in every pool of the region
        self.calls = 0
        self.by_status: collections.Counter[int] = collections.Counter()
        # Successful calls and their tokens, per trafficType.
        self.by_traffic_type: collections.Counter[str] = collections.Counter()
        self.prompt_tokens: collections.Counter[str] = collections.Counter()
        self.candidates_tokens: collections.Counter[str] = collections.Counter()
        self.max_in_flight = 0
        self.behaviour = behaviour
        self.shared = _PoolState(behaviour, now)
        self.provisioned = _PoolState(None, now)
        self.flex = _PoolState(behaviour.flex, now)
        self.priority = _PoolState(behaviour.priority, now)

    def restart(self, now: float) -> None:
        """Start every pool's script from its first status and refill its token bucket."""
        self.shared.restart(self.behaviour, now)
        self.flex.restart(self.behaviour.flex, now)
        self.priority.restart(self.behaviour.priority, now)

    def clear_counts(self) -> None:
        """Forget the counts (not what is in flight)."""
        self.calls = 0
        self.by_status.clear()
        self.by_traffic_type.clear()
        self.prompt_tokens.clear()
        self.candidates_tokens.clear()
        self.max_in_flight = self.in_flight


@dataclass(frozen=True, slots=True)
class _Call:
    """One model call, as the bookkeeping needs it."""

    method: str
    region: str
    state: _RegionState
    arrived: float
    text: str
    request_type: str | None
    shared_request_type: str | None


@dataclass(frozen=True, slots=True)
class _Grant:
    """What admission gave a call: the pool it holds a slot in and how that pool answers."""

    pool: _PoolState
    status: int
    latency_s: float
    traffic_type: str
    response_bytes: int


# The call log's tuples: (t, region, status, text[:200], latency_s, request_type,
# shared_request_type, traffic_type, method, chunk_times). Tuples, not dicts, to keep the
# hot path cheap.
_LogEntry = tuple[
    float, str, int, str, float, str | None, str | None, str | None, str, tuple[float, ...] | None
]

_Handler = Callable[[Request, _Call, str, bytes], Awaitable[Response]]


class StreamBroken(Exception):
    """Raised inside a stream on purpose (``stream_fail_after``) to drop the connection."""


class _Standin:
    """The stand-in's state and endpoints.

    Everything runs on one event loop and no bookkeeping step awaits, so the counters
    need no lock.
    """

    def __init__(self, config: StandinConfig) -> None:
        self.startup_config = config
        self.config = config
        self.regions: dict[str, _RegionState] = {}
        self.started = time.monotonic()
        self.total_calls = 0
        self.authorization_headers = 0
        self.calls_by_text: collections.Counter[str] = collections.Counter()
        self.call_log: collections.deque[_LogEntry] = collections.deque(maxlen=CALL_LOG_LIMIT)
        self.handlers: Mapping[str, _Handler] = MappingProxyType(
            {
                GENERATE_CONTENT: self._generate_content,
                STREAM_GENERATE_CONTENT: self._stream_generate_content,
                COUNT_TOKENS: self._count_tokens,
                COMPUTE_TOKENS: self._compute_tokens,
                PREDICT: self._embed,
                EMBED_CONTENT: self._embed,
                BATCH_EMBED_CONTENTS: self._embed,
            }
        )

    # -- model calls -------------------------------------------------------------------

    async def model_call(self, request: Request) -> Response:
        """Answer one call to a publisher model, as its method and its region say."""
        arrived = time.monotonic()
        params = request.path_params
        model, _, method = str(params["model_action"]).rpartition(":")
        handler = self.handlers.get(method)
        if params["version"] not in API_VERSIONS or handler is None or not model:
            return google_error(404, f"Method not found: {request.url.path}")
        # Read the body before touching any state: a reset or config change may happen
        # during this await, and the call must count against what is current after it.
        body = await request.body()
        region = str(params["location"])
        state = self.regions.get(region)
        if state is None:
            state = self.regions[region] = _RegionState(self.config.behaviour_for(region), arrived)
        headers = request.headers
        if "authorization" in headers:
            self.authorization_headers += 1
        call = _Call(
            method,
            region,
            state,
            arrived,
            "",
            headers.get(REQUEST_TYPE_HEADER),
            headers.get(SHARED_REQUEST_TYPE_HEADER),
        )
        return await handler(request, call, model, body)

    async def _generate_content(
        self, request: Request, call: _Call, model: str, body: bytes
    ) -> Response:
        """Answer ``generateContent``: the whole reply in one body."""
        try:
            text, prompt_chars = _read_prompt(_json_object(body))
        except _BadRequest as exc:
            self._record(call, 400)
            return google_error(400, str(exc))
        call = dataclasses.replace(call, text=text)
        self.calls_by_text[text] += 1
        grant = self._admit(call)
        if isinstance(grant, Response):
            return grant
        if not await self._hold(request, call, grant):
            return Response(status_code=CLIENT_CLOSED)  # nobody is listening
        if grant.status != 200:
            return self._error(call, grant.status)
        reply = f"stand-in reply from {call.region}: {call.text}"
        body, prompt_tokens, candidates_tokens = _success_body(
            reply, model, prompt_chars, grant.response_bytes, grant.traffic_type
        )
        self._record(call, 200, grant.traffic_type, prompt_tokens, candidates_tokens)
        return Response(body, headers=_JSON_HEADERS)

    async def _stream_generate_content(
        self, request: Request, call: _Call, model: str, body: bytes
    ) -> Response:
        """Answer ``streamGenerateContent``: the reply in chunks, SSE with ``?alt=sse``.

        Admission, the latency and the status are those of ``generateContent``, all before
        the first byte; the call keeps its slot until its last chunk is sent.
        """
        alt = request.query_params.get("alt", "json")
        try:
            if alt not in ("json", "sse"):
                raise _BadRequest(f"Invalid value at 'alt' ({alt!r}): expected json or sse.")
            text, prompt_chars = _read_prompt(_json_object(body))
        except _BadRequest as exc:
            self._record(call, 400)
            return google_error(400, str(exc))
        call = dataclasses.replace(call, text=text)
        self.calls_by_text[text] += 1
        grant = self._admit(call)
        if isinstance(grant, Response):
            return grant
        release = self._occupy(call, grant.pool)
        stream: _Stream | None = None
        try:
            if grant.latency_s > 0 and not await _sleep_unless_disconnected(
                request.receive, grant.latency_s
            ):
                self._record(call, CLIENT_CLOSED)
                return Response(status_code=CLIENT_CLOSED)
            if grant.status != 200:
                return self._error(call, grant.status)
            # Streams pad the reply text itself to response_bytes characters.
            reply = f"stand-in reply from {call.region}: {call.text}"
            reply += "x" * max(0, grant.response_bytes - len(reply))
            behaviour, prompt_tokens = call.state.behaviour, _tokens(prompt_chars)
            stream = _Stream(
                self,
                call,
                release,
                _stream_chunks(
                    reply,
                    behaviour.stream_chunks,
                    model=model,
                    prompt_tokens=prompt_tokens,
                    traffic_type=grant.traffic_type,
                ),
                sse=alt == "sse",
                chunk_delay_s=behaviour.chunk_delay_s,
                fail_after=behaviour.stream_fail_after,
                traffic_type=grant.traffic_type,
                prompt_tokens=prompt_tokens,
            )
        finally:
            if stream is None:  # answered before streaming, or cancelled: free the slot now
                release()
        return _ClosingStreamingResponse(
            stream.body(),
            on_close=stream.close,
            media_type="text/event-stream" if stream.sse else _JSON_HEADERS["content-type"],
        )

    async def _count_tokens(
        self, request: Request, call: _Call, model: str, body: bytes
    ) -> Response:
        """Answer ``countTokens`` at once: the prompt's tokens by the stand-in's estimate.

        Token counting is not generation: it takes no slot and follows no status or script.
        """
        try:
            text, chars = _read_prompt(_json_object(body))
        except _BadRequest as exc:
            self._record(call, 400)
            return google_error(400, str(exc))
        self._record(dataclasses.replace(call, text=text), 200)
        tokens = _tokens(chars)
        return _json(
            {
                "totalTokens": tokens,
                "totalBillableCharacters": chars,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
            }
        )

    async def _compute_tokens(
        self, request: Request, call: _Call, model: str, body: bytes
    ) -> Response:
        """Answer ``computeTokens`` at once: each content's text in four-character tokens."""
        try:
            doc = _json_object(body)
            text, _ = _read_prompt(doc)
            tokens_info = _tokens_info(doc["contents"])
        except _BadRequest as exc:
            self._record(call, 400)
            return google_error(400, str(exc))
        self._record(dataclasses.replace(call, text=text), 200)
        return _json({"tokensInfo": tokens_info})

    async def _embed(self, request: Request, call: _Call, model: str, body: bytes) -> Response:
        """Answer ``predict``, ``embedContent`` or ``batchEmbedContents`` with embeddings.

        Embedding calls are admitted, held and answered like ``generateContent`` calls, in
        the same pools.
        """
        try:
            inputs = _embedding_inputs(call.method, body, _default_dimension(model))
        except _BadRequest as exc:
            self._record(call, 400)
            return google_error(400, str(exc))
        call = dataclasses.replace(call, text=inputs[0][0])
        grant = self._admit(call)
        if isinstance(grant, Response):
            return grant
        if not await self._hold(request, call, grant):
            return Response(status_code=CLIENT_CLOSED)
        if grant.status != 200:
            return self._error(call, grant.status)
        doc, tokens = _embedding_body(call.method, inputs)
        self._record(call, 200, grant.traffic_type, tokens)
        return _json(doc)

    def _admit(self, call: _Call) -> _Grant | Response:
        """Choose the pool that serves ``call``, or return the 400 or 429 refusing it."""
        region, state = call.region, call.state
        problem = _header_problem(region, call.request_type, call.shared_request_type)
        if problem is not None:
            self._record(call, 400)
            return google_error(400, problem)

        behaviour = state.behaviour
        provisioned = behaviour.provisioned_capacity or 0
        if call.request_type != SHARED and state.provisioned.in_flight < provisioned:
            latency_s = behaviour.provisioned_latency_s
            return _Grant(
                state.provisioned,
                status=200,
                latency_s=behaviour.latency_s if latency_s is None else latency_s,
                traffic_type=PROVISIONED_THROUGHPUT,
                response_bytes=behaviour.response_bytes,
            )
        if call.request_type == DEDICATED:
            self._record(call, 429)
            return google_error(
                429,
                f"{_PT_EXHAUSTED} (stand-in: Provisioned Throughput exhausted in region "
                f"{region}, provisioned_capacity {provisioned})",
            )

        # Pay-as-you-go: standard, or the flex or priority pool when the region has one.
        traffic_type, pool_behaviour, pool, label = ON_DEMAND, behaviour, state.shared, ""
        if call.shared_request_type == FLEX:
            traffic_type = ON_DEMAND_FLEX
            if behaviour.flex is not None:
                pool_behaviour, pool, label = behaviour.flex, state.flex, "flex "
        elif call.shared_request_type == PRIORITY:
            traffic_type = ON_DEMAND_PRIORITY
            if behaviour.priority is not None:
                pool_behaviour, pool, label = behaviour.priority, state.priority, "priority "
        capacity = pool_behaviour.capacity
        if capacity is not None and pool.in_flight >= capacity:
            self._record(call, 429)
            return google_error(429, f"{_MESSAGES[429]} (stand-in {label}capacity {capacity})")
        rate = pool_behaviour.rate_per_s
        if rate is not None and not pool.take_token(rate, call.arrived):
            self._record(call, 429)
            return google_error(429, f"{_MESSAGES[429]} (stand-in {label}rate {rate}/s)")
        return _Grant(
            pool,
            status=pool.script.popleft() if pool.script else pool_behaviour.status,
            latency_s=pool_behaviour.latency_s,
            traffic_type=traffic_type,
            response_bytes=pool_behaviour.response_bytes,
        )

    def _occupy(self, call: _Call, pool: _PoolState) -> Callable[[], None]:
        """Take a slot in ``pool`` (and the region) and return the function that frees it.

        The returned function frees the slot once, however many times it is called.
        """
        state = call.state
        state.in_flight += 1
        pool.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                state.in_flight -= 1
                pool.in_flight -= 1

        return release

    async def _hold(self, request: Request, call: _Call, grant: _Grant) -> bool:
        """Hold a slot in the grant's pool for its latency.

        Returns:
            True when the latency passed; False (recorded as 499) if the client left.
        """
        release = self._occupy(call, grant.pool)
        try:
            if grant.latency_s > 0 and not await _sleep_unless_disconnected(
                request.receive, grant.latency_s
            ):
                self._record(call, CLIENT_CLOSED)
                return False
        finally:
            # Also runs when the task is cancelled (server shutdown), so the slot is freed.
            release()
        return True

    def _error(self, call: _Call, status: int) -> Response:
        """Record ``status`` for ``call`` and return it as the pool's error answer."""
        self._record(call, status)
        return google_error(status, f"{_MESSAGES[status]} (stand-in: region {call.region})")

    def _record(
        self,
        call: _Call,
        status: int,
        traffic_type: str | None = None,
        prompt_tokens: int = 0,
        candidates_tokens: int = 0,
        chunk_times: Sequence[float] | None = None,
    ) -> None:
        now = time.monotonic()
        self.total_calls += 1
        state = call.state
        state.calls += 1
        state.by_status[status] += 1
        if traffic_type is not None:
            state.by_traffic_type[traffic_type] += 1
            state.prompt_tokens[traffic_type] += prompt_tokens
            state.candidates_tokens[traffic_type] += candidates_tokens
        self.call_log.append(
            (
                call.arrived - self.started,
                call.region,
                status,
                call.text[:200],
                now - call.arrived,
                call.request_type,
                call.shared_request_type,
                traffic_type,
                call.method,
                None if chunk_times is None else tuple(t - self.started for t in chunk_times),
            )
        )

    # -- control API -------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """Say the process is up."""
        return PlainTextResponse("ok")

    async def get_config(self, request: Request) -> Response:
        """Return the current config."""
        return _json(self.config.to_doc())

    async def put_config(self, request: Request) -> Response:
        """Replace the whole config and restart every region's script."""
        try:
            config = StandinConfig.from_doc(await _json_body(request))
        except (ConfigError, _BadRequest) as exc:
            return google_error(400, str(exc))
        self._apply_config(config)
        return _json(config.to_doc())

    async def patch_region(self, request: Request) -> Response:
        """Merge fields into one region's behaviour; a new ``script`` restarts its script.

        ``flex`` and ``priority`` merge into the region's pool the same way.
        """
        region = str(request.path_params["region"])
        try:
            doc = await _json_body(request)
            behaviour = RegionBehaviour.from_doc(
                doc, base=self.config.behaviour_for(region), where=f"regions.{region}"
            )
            config = self.config.with_region(region, behaviour)
        except (ConfigError, _BadRequest) as exc:
            return google_error(400, str(exc))
        self.config = config
        state = self.regions.get(region)
        if state is not None:
            now = time.monotonic()
            previous, state.behaviour = state.behaviour, behaviour
            _restart_changed(state.shared, behaviour, doc, now)
            for tier in _PAYGO_NAMES:
                if tier not in doc:
                    continue
                pool, pool_behaviour = getattr(state, tier), getattr(behaviour, tier)
                if doc[tier] is None or getattr(previous, tier) is None:
                    pool.restart(pool_behaviour, now)  # a new pool starts afresh
                else:
                    _restart_changed(pool, pool_behaviour, doc[tier], now)
        return _json(behaviour.to_doc())

    async def reset(self, request: Request) -> Response:
        """Clear stats and the call log, and restore the start-up config."""
        self.started = time.monotonic()
        self.total_calls = 0
        self.authorization_headers = 0
        self.calls_by_text.clear()
        self.call_log.clear()
        # Regions with calls still in flight keep their state (those calls free their slot
        # when they finish); the others are forgotten.
        self.regions = {r: s for r, s in self.regions.items() if s.in_flight}
        for state in self.regions.values():
            state.clear_counts()
        self._apply_config(self.startup_config)
        return _json(self.config.to_doc())

    async def stats(self, request: Request) -> Response:
        """Return call counts (per region, status, traffic type and first text) and tokens.

        Token totals are per traffic type, per region and over all regions.
        """
        prompt_tokens: collections.Counter[str] = collections.Counter()
        candidates_tokens: collections.Counter[str] = collections.Counter()
        for state in self.regions.values():
            prompt_tokens.update(state.prompt_tokens)
            candidates_tokens.update(state.candidates_tokens)
        return _json(
            {
                "total_calls": self.total_calls,
                "regions": {
                    region: {
                        "calls": state.calls,
                        "by_status": {str(s): n for s, n in sorted(state.by_status.items())},
                        "by_traffic_type": dict(sorted(state.by_traffic_type.items())),
                        "tokens": _tokens_doc(state.prompt_tokens, state.candidates_tokens),
                        "max_in_flight": state.max_in_flight,
                        "in_flight": state.in_flight,
                    }
                    for region, state in sorted(self.regions.items())
                },
                "tokens": _tokens_doc(prompt_tokens, candidates_tokens),
                "calls_by_text": dict(self.calls_by_text),
                "authorization_headers": self.authorization_headers,
            }
        )

    async def calls(self, request: Request) -> Response:
        """Return the call log, oldest first (the last `CALL_LOG_LIMIT` calls)."""
        return _json(
            [
                {
                    "t": t,
                    "region": region,
                    "status": status,
                    "text": text,
                    "latency_s": latency,
                    "request_type": request_type,
                    "shared_request_type": shared_request_type,
                    "traffic_type": traffic_type,
                    "method": method,
                    "chunk_times": None if chunk_times is None else list(chunk_times),
                }
                for (
                    t,
                    region,
                    status,
                    text,
                    latency,
                    request_type,
                    shared_request_type,
                    traffic_type,
                    method,
                    chunk_times,
                ) in self.call_log
            ]
        )

    def _apply_config(self, config: StandinConfig) -> None:
        self.config = config
        now = time.monotonic()
        for region, state in self.regions.items():
            state.behaviour = config.behaviour_for(region)
            state.restart(now)


def _restart_changed(
    pool: _PoolState, behaviour: RegionBehaviour | None, doc: Mapping[str, object], now: float
) -> None:
    """Restart only what a PATCH ``doc`` changed: a latency tweak mid-script keeps the script."""
    if "script" in doc or "rate_per_s" in doc:
        remaining = pool.script
        pool.restart(behaviour, now)
        if "script" not in doc:
            pool.script = remaining


def _tokens_doc(
    prompt_tokens: Mapping[str, int], candidates_tokens: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Return ``{TRAFFIC_TYPE: {"prompt": n, "candidates": n, "total": n}}``."""
    return {
        traffic_type: {
            "prompt": prompt,
            "candidates": candidates_tokens[traffic_type],
            "total": prompt + candidates_tokens[traffic_type],
        }
        for traffic_type, prompt in sorted(prompt_tokens.items())
    }


def _header_problem(
    region: str, request_type: str | None, shared_request_type: str | None
) -> str | None:
    """Return why Vertex would refuse these request-type headers, or None if it would not."""
    if request_type not in (None, DEDICATED, SHARED):
        return (
            f"Invalid value {request_type!r} for header {REQUEST_TYPE_HEADER}: "
            f"expected {DEDICATED!r} or {SHARED!r}."
        )
    if shared_request_type is None:
        return None
    if shared_request_type not in _PAYGO_NAMES:
        return (
            f"Invalid value {shared_request_type!r} for header {SHARED_REQUEST_TYPE_HEADER}: "
            f"expected {FLEX!r} or {PRIORITY!r}."
        )
    if region != GLOBAL_LOCATION:
        return (
            f"{_PAYGO_NAMES[shared_request_type]} ({SHARED_REQUEST_TYPE_HEADER}: "
            f"{shared_request_type}) is only served on the global endpoint (location "
            f"{GLOBAL_LOCATION}, host aiplatform.googleapis.com), not in location {region}."
        )
    return None


class _BadRequest(Exception):
    """The request body is not what the endpoint accepts."""


def _json_object(body: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object.

    Raises:
        _BadRequest: With a message like Vertex's for the same mistake.
    """
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise _BadRequest(f"Invalid JSON payload received. {exc}") from exc
    if not isinstance(doc, dict):
        raise _BadRequest("Invalid JSON payload received. The body must be a JSON object.")
    return doc


def _read_prompt(doc: Mapping[str, Any]) -> tuple[str, int]:
    """Return the first user text and the number of text characters in the request.

    The characters are those of every text part of ``contents`` and ``systemInstruction``.

    Raises:
        _BadRequest: With a message like Vertex's for the same mistake.
    """
    contents = doc.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _BadRequest(
            "Unable to submit request because it has an empty contents field. "
            "Add a non-empty 'contents' list."
        )
    first_user_text: str | None = None
    chars = 0
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            raise _BadRequest(f"Invalid value at 'contents[{i}]': must be an object.")
        parts = content.get("parts")
        if not isinstance(parts, list):
            continue
        # Vertex treats a content without a role as the user's.
        is_user = content.get("role", "user") == "user"
        for part in parts:
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str):
                chars += len(text)
                if is_user and first_user_text is None:
                    first_user_text = text
    system = doc.get("systemInstruction")
    system_parts = system.get("parts") if isinstance(system, dict) else None
    for part in system_parts if isinstance(system_parts, list) else ():
        text = part.get("text") if isinstance(part, dict) else None
        if isinstance(text, str):
            chars += len(text)
    return first_user_text or "", chars


def _tokens(chars: int) -> int:
    # About four characters per token, as Google's own rule of thumb: ceil(chars / 4), at
    # least 1, so that tests can predict the counts.
    return max(1, (chars + 3) // 4)


def _success_body(
    reply: str, model: str, prompt_chars: int, response_bytes: int, traffic_type: str
) -> tuple[bytes, int, int]:
    """Render a Vertex-shaped success body, padding ``reply`` to ``response_bytes`` if set.

    Returns:
        The body, its ``promptTokenCount`` and its ``candidatesTokenCount``.
    """
    create_time = _create_time()
    response_id = secrets.token_urlsafe(18)
    prompt_tokens = _tokens(prompt_chars)
    while True:
        reply_tokens = _tokens(len(reply))
        body = _dumps(
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": reply}]},
                        "finishReason": "STOP",
                        "avgLogprobs": -0.1,
                    }
                ],
                "usageMetadata": _usage(prompt_tokens, reply_tokens, traffic_type),
                "modelVersion": model,
                "createTime": create_time,
                "responseId": response_id,
            }
        )
        missing = response_bytes - len(body)
        if missing <= 0:
            return body, prompt_tokens, reply_tokens
        # "x" needs no escaping, so each one adds one byte; the token counts may grow by a
        # digit, which the next round covers.
        reply += "x" * missing


def _usage(prompt_tokens: int, reply_tokens: int, traffic_type: str) -> dict[str, Any]:
    """Return a generation's ``usageMetadata``."""
    return {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": reply_tokens,
        "totalTokenCount": prompt_tokens + reply_tokens,
        # The stand-in caches nothing and does not think, so cachedContentTokenCount and
        # thoughtsTokenCount (sent when non-zero) never appear.
        "trafficType": traffic_type,
    }


def _create_time() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _stream_chunks(
    reply: str, count: int, *, model: str, prompt_tokens: int, traffic_type: str
) -> list[tuple[bytes, int]]:
    """Split ``reply`` into at most ``count`` streamGenerateContent chunks (fewer if short).

    Only the last chunk has ``finishReason`` (STOP) and ``usageMetadata`` (for the whole
    reply); every chunk has the same ``responseId`` and ``createTime``.

    Returns:
        Each chunk's JSON and the number of reply characters in it, in order.
    """
    count = max(1, min(count, len(reply)))
    size, extra = divmod(len(reply), count)
    create_time, response_id = _create_time(), secrets.token_urlsafe(18)
    chunks: list[tuple[bytes, int]] = []
    start = 0
    for i in range(count):
        end = start + size + (i < extra)
        candidate: dict[str, Any] = {
            "content": {"role": "model", "parts": [{"text": reply[start:end]}]}
        }
        doc: dict[str, Any] = {"candidates": [candidate]}
        if i == count - 1:
            candidate["finishReason"] = "STOP"
            doc["usageMetadata"] = _usage(prompt_tokens, _tokens(len(reply)), traffic_type)
        doc.update(modelVersion=model, createTime=create_time, responseId=response_id)
        chunks.append((_dumps(doc), end - start))
        start = end
    return chunks


class _Stream:
    """One streamGenerateContent reply on its way out, and what the call log needs of it.

    Framing as Vertex sends it: with ``alt=sse``, ``data: CHUNK\r\n\r\n`` per chunk
    (Server-Sent Events); without, one JSON array written as it goes,
    ``[CHUNK\n,\r\nCHUNK\n]``.
    """

    def __init__(
        self,
        standin: _Standin,
        call: _Call,
        release: Callable[[], None],
        chunks: list[tuple[bytes, int]],
        *,
        sse: bool,
        chunk_delay_s: float,
        fail_after: int | None,
        traffic_type: str,
        prompt_tokens: int,
    ) -> None:
        self.standin, self.call, self.release, self.chunks = standin, call, release, chunks
        self.sse, self.chunk_delay_s, self.fail_after = sse, chunk_delay_s, fail_after
        self.traffic_type, self.prompt_tokens = traffic_type, prompt_tokens
        self.sent_times: list[float] = []
        self.sent_chars = 0
        self.finished = self.broken = False

    async def body(self) -> AsyncIterator[bytes]:
        """Yield the framed chunks, ``chunk_delay_s`` apart; break at ``fail_after``.

        Raises:
            StreamBroken: After ``fail_after`` chunks, so that the server drops the
                connection mid-body (no closing chunk, no closing bracket).
        """
        for i, (chunk, chars) in enumerate(self.chunks):
            if i == self.fail_after:
                self.broken = True
                raise StreamBroken(
                    f"stand-in: stream_fail_after {i} in region {self.call.region}: "
                    "the stream breaks here on purpose"
                )
            if i and self.chunk_delay_s > 0:
                await asyncio.sleep(self.chunk_delay_s)
            self.sent_times.append(time.monotonic())
            self.sent_chars += chars
            if self.sse:
                yield b"data: " + chunk + b"\r\n\r\n"
            else:
                yield (b"\n,\r\n" if i else b"[") + chunk
        if not self.sse:
            yield b"\n]"
        self.finished = True

    def close(self) -> None:
        """Free the call's slot and record it: 200 if sent or broken on purpose, else 499."""
        self.release()
        sent = self.finished or self.broken
        self.standin._record(
            self.call,
            200 if sent else CLIENT_CLOSED,
            self.traffic_type if sent else None,
            self.prompt_tokens if sent else 0,
            _tokens(self.sent_chars) if sent and self.sent_chars else 0,
            chunk_times=self.sent_times,
        )


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls ``on_close`` once it ends, however it ends.

    Also when the body never starts (the client left first) or the task is cancelled,
    where a ``finally`` inside the body's generator would not run.
    """

    def __init__(
        self, content: AsyncIterator[bytes], *, on_close: Callable[[], None], media_type: str
    ) -> None:
        super().__init__(content, media_type=media_type)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


_VOCABULARY: Final = 256_000
"""The stand-in's token ids are below this (Gemini's vocabulary has about 256k tokens)."""


def _tokens_info(contents: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return computeTokens' ``tokensInfo``: each content's text cut into 4-character tokens.

    Args:
        contents: The request's ``contents``, already checked by `_read_prompt`.
    """
    info = []
    for content in contents:
        parts = content.get("parts")
        text = "".join(
            part["text"]
            for part in (parts if isinstance(parts, list) else ())
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
        pieces = [text[i : i + 4].encode() for i in range(0, len(text), 4)]
        info.append(
            {
                "tokens": [base64.b64encode(piece).decode() for piece in pieces],
                # int64 ids, which Google's JSON mapping writes as strings.
                "tokenIds": [str(zlib.crc32(piece) % _VOCABULARY) for piece in pieces],
                "role": content.get("role", "user"),
            }
        )
    return info


def _default_dimension(model: str) -> int:
    return _EMBEDDING_DIMENSIONS.get(model, DEFAULT_EMBEDDING_DIMENSION)


def _dimension(value: object, largest: int, where: str) -> int:
    """Return the requested ``outputDimensionality`` (``largest`` when absent).

    Raises:
        _BadRequest: It is not an integer from 1 to ``largest``.
    """
    if value is None:
        return largest
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= largest:
        raise _BadRequest(f"Invalid value at '{where}' ({value!r}): must be 1 to {largest}.")
    return value


def _content_text(content: object, where: str) -> str:
    """Return the text of a Content's parts, joined.

    Raises:
        _BadRequest: ``content`` is not a Content with a ``parts`` list.
    """
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        raise _BadRequest(f"Invalid value at '{where}': must be a Content with parts.")
    return "".join(
        part["text"]
        for part in parts
        if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def _embedding_inputs(method: str, body: bytes, largest: int) -> list[tuple[str, int]]:
    """Return each text to embed and its dimension, from the body of ``method``.

    Args:
        method: `PREDICT` (``{"instances": [{"content": TEXT}], "parameters": {...}}``),
            `EMBED_CONTENT` (``{"content": CONTENT, "embedContentConfig": {...}}``) or
            `BATCH_EMBED_CONTENTS` (``{"requests": [{"content": ..., ...}]}``).
        body: The request body.
        largest: The model's default and largest dimension.

    Raises:
        _BadRequest: The body is not what ``method`` takes.
    """
    doc = _json_object(body)
    if method == PREDICT:
        instances = doc.get("instances")
        if not isinstance(instances, list) or not instances:
            raise _BadRequest("Invalid value at 'instances': must be a non-empty list.")
        parameters = doc.get("parameters", {})
        if not isinstance(parameters, dict):
            raise _BadRequest("Invalid value at 'parameters': must be an object.")
        dimension = _dimension(
            parameters.get("outputDimensionality"), largest, "parameters.outputDimensionality"
        )
        texts = []
        for i, instance in enumerate(instances):
            text = instance.get("content") if isinstance(instance, dict) else None
            if not isinstance(text, str):
                raise _BadRequest(f"Invalid value at 'instances[{i}].content': must be a string.")
            texts.append(text)
        return [(text, dimension) for text in texts]

    requests = [doc] if method == EMBED_CONTENT else doc.get("requests")
    if not isinstance(requests, list) or not requests:
        raise _BadRequest("Invalid value at 'requests': must be a non-empty list.")
    inputs = []
    for i, one in enumerate(requests):
        prefix = f"requests[{i}]." if method == BATCH_EMBED_CONTENTS else ""
        config = one.get("embedContentConfig", {}) if isinstance(one, dict) else None
        if not isinstance(one, dict) or not isinstance(config, dict):
            raise _BadRequest(f"Invalid value at '{prefix or 'request'}': must be an object.")
        # google-genai nests the options in embedContentConfig; v1's REST reference puts
        # them beside content. Take either.
        requested = config.get("outputDimensionality", one.get("outputDimensionality"))
        inputs.append(
            (
                _content_text(one.get("content"), f"{prefix}content"),
                _dimension(requested, largest, f"{prefix}outputDimensionality"),
            )
        )
    return inputs


def _embedding(text: str, dimension: int) -> list[float]:
    """Return a unit vector of ``dimension`` values that depends only on ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    rng = random.Random(seed)  # noqa: S311 (a deterministic fake vector, not a secret)
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimension)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _embedding_body(method: str, inputs: Sequence[tuple[str, int]]) -> tuple[dict[str, Any], int]:
    """Render the success body of an embedding ``method`` for ``inputs``.

    Returns:
        The body and its prompt tokens (ceil(characters / 4), at least 1, per text).
    """
    tokens = [_tokens(len(text)) for text, _ in inputs]
    vectors = [_embedding(text, dimension) for text, dimension in inputs]
    total = sum(tokens)
    usage = {"promptTokenCount": total, "totalTokenCount": total}
    doc: dict[str, Any]
    if method == PREDICT:
        # https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/text-embeddings-api
        statistics = [{"truncated": False, "token_count": n} for n in tokens]
        doc = {
            "predictions": [
                {"embeddings": {"values": vector, "statistics": stats}}
                for vector, stats in zip(vectors, statistics, strict=True)
            ],
            "metadata": {"billableCharacterCount": sum(len(text) for text, _ in inputs)},
        }
    elif method == EMBED_CONTENT:
        doc = {"embedding": {"values": vectors[0]}, "usageMetadata": usage, "truncated": False}
    else:
        doc = {"embeddings": [{"values": vector} for vector in vectors], "usageMetadata": usage}
    return doc, total


async def _sleep_unless_disconnected(receive: Receive, seconds: float) -> bool:
    """Sleep ``seconds``; stop early if the client disconnects.

    A client killed mid-call would otherwise hold a capacity slot for the whole latency,
    since the server does not cancel the handler when the connection drops.

    Returns:
        True if the full time passed, False if the client went away.
    """
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
    finally:
        watcher.cancel()
    if done:
        watcher.result()  # re-raises if receive() itself failed
        return False
    return True


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise _BadRequest(f"Invalid JSON payload received. {exc}") from exc


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _json(doc: object, status_code: int = 200) -> Response:
    return Response(_dumps(doc), status_code=status_code, headers=_JSON_HEADERS)


def google_error(code: int, message: str) -> Response:
    """Return an error in Google's JSON shape.

    Args:
        code: The HTTP status; its Google status name comes from
            `dispatcher.status.status_name` (``"UNKNOWN"`` if it has none).
        message: The human-readable message.

    Returns:
        ``{"error": {"code": code, "message": message, "status": NAME}}`` with status ``code``.
    """
    error = {"code": code, "message": message, "status": status_name(code)}
    return _json({"error": error}, status_code=code)


async def _http_exception(request: Request, exc: Exception) -> Response:
    # Unknown paths and methods answer in Google's shape too, as Vertex does.
    if not isinstance(exc, HTTPException):  # Starlette only routes HTTPException here
        raise exc
    response = google_error(exc.status_code, exc.detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def create_app(config: StandinConfig | None = None) -> Starlette:
    """Build the stand-in ASGI app.

    Args:
        config: Behaviour per region at start-up (and after ``POST /_standin/reset``);
            every region answers 200 at once when None.

    Returns:
        A Starlette app serving the model methods, ``/healthz`` and ``/_standin/*``.
    """
    standin = _Standin(config or StandinConfig())
    # The model and its method share one segment ("MODEL:generateContent"): Starlette's
    # str converter matches anything but "/", and the handler splits on the last ":".
    generate_path = (
        "/{version}/projects/{project}/locations/{location}/publishers/google/models/{model_action}"
    )
    routes = [
        Route(generate_path, standin.model_call, methods=["POST"]),
        Route("/healthz", standin.healthz, methods=["GET"]),
        Route("/_standin/config", standin.get_config, methods=["GET"]),
        Route("/_standin/config", standin.put_config, methods=["PUT"]),
        Route("/_standin/regions/{region}", standin.patch_region, methods=["PATCH"]),
        Route("/_standin/reset", standin.reset, methods=["POST"]),
        Route("/_standin/stats", standin.stats, methods=["GET"]),
        Route("/_standin/calls", standin.calls, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    app.state.standin = standin
    return app


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints its address once it accepts connections."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            # Scripts wait for this exact line to learn the port (with --port 0).
            print(f"vertex-standin listening on {self.url}", flush=True)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the stand-in until interrupted (the ``python -m`` entry point).

    Args:
        argv: Command-line arguments without the program name (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher_devtools.vertex_standin",
        description="Development stand-in for Vertex AI's model methods (not Vertex).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--config",
        help=f'behaviour JSON {{"default": {{...}}, "regions": {{...}}}}; default ${CONFIG_ENV}',
    )
    args = parser.parse_args(argv)

    source, text = ("--config", args.config) if args.config is not None else (CONFIG_ENV, None)
    if text is None:
        text = os.environ.get(CONFIG_ENV)
    try:
        config = StandinConfig.from_json(text) if text else StandinConfig()
    except ConfigError as exc:
        parser.error(f"{source}: {exc}")

    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        parser.error(f"cannot bind {args.host}:{args.port}: {exc}")
    bound_port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    server = _AnnouncingServer(
        uvicorn.Config(
            create_app(config),
            loop="auto",
            http="auto",
            lifespan="off",
            access_log=False,  # no per-call logging: benchmarks push thousands of calls
            log_level="warning",
            # Calls may sleep for 30 s; don't let them hold up a test's teardown.
            timeout_graceful_shutdown=1,
        ),
        url=f"http://{shown_host}:{bound_port}",
    )
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
