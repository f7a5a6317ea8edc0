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

Shapes follow https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/inference
and Google's error model (https://cloud.google.com/apis/design/errors).

Run it with::

    python -m dispatcher_devtools.vertex_standin --host 127.0.0.1 --port 8090 \\
        --config '{"default": {"latency_s": 0.05}, "regions": {"europe-west4": {"status": 503}}}'
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive

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
    """

    latency_s: float = 0.0
    capacity: int | None = None
    rate_per_s: float | None = None
    status: int = 200
    script: tuple[int, ...] = ()
    response_bytes: int = 0

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
            doc: A JSON object whose keys are a subset of this class's fields.
            base: The behaviour whose fields are kept where ``doc`` is silent
                (the class defaults when None).
            where: Where ``doc`` sits in the config, for error messages.

        Returns:
            The merged behaviour.

        Raises:
            ConfigError: A key is unknown or a value has the wrong type or range.
        """
        if not isinstance(doc, dict):
            raise ConfigError(where, "must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(where, f"unknown field(s) {unknown}; known: {sorted(known)}")
        changes = {name: _validated(name, value, f"{where}.{name}") for name, value in doc.items()}
        return dataclasses.replace(base or cls(), **changes)

    def to_doc(self) -> dict[str, Any]:
        """Return the JSON form accepted by `from_doc`."""
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
    ``default``.
    """

    default: RegionBehaviour = RegionBehaviour()
    regions: Mapping[str, RegionBehaviour] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only copy keeps the frozen config frozen even if the caller's dict changes.
        object.__setattr__(self, "regions", MappingProxyType(dict(self.regions)))

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


class _RegionState:
    """What the stand-in tracks for one region: live counters and what is left of its script."""

    __slots__ = (
        "behaviour",
        "by_status",
        "calls",
        "in_flight",
        "last_refill",
        "max_in_flight",
        "script",
        "tokens",
    )

    def __init__(self, behaviour: RegionBehaviour, now: float) -> None:
        self.in_flight = 0
        self.calls = 0
        self.by_status: collections.Counter[int] = collections.Counter()
        self.max_in_flight = 0
        self.behaviour = behaviour
        self.restart(now)

    def restart(self, now: float) -> None:
        """Start the script from its first status and refill the token bucket."""
        self.script = collections.deque(self.behaviour.script)
        # A full bucket, like a region that has been idle.
        self.tokens = max(1.0, self.behaviour.rate_per_s or 0.0)
        self.last_refill = now

    def take_token(self, rate: float, now: float) -> bool:
        burst = max(1.0, rate)
        self.tokens = min(burst, self.tokens + (now - self.last_refill) * rate)
        self.last_refill = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


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
        # (t, region, status, text[:200], latency_s): tuples, not dicts, to keep the hot path cheap.
        self.call_log: collections.deque[tuple[float, str, int, str, float]] = collections.deque(
            maxlen=CALL_LOG_LIMIT
        )

    # -- generateContent ---------------------------------------------------------------

    async def generate_content(self, request: Request) -> Response:
        """Answer one generateContent call as the region's behaviour says."""
        arrived = time.monotonic()
        params = request.path_params
        model, _, action = str(params["model_action"]).rpartition(":")
        if params["version"] not in API_VERSIONS or action != "generateContent" or not model:
            return google_error(404, f"Method not found: {request.url.path}")
        # Read the body before touching any state: a reset or config change may happen
        # during this await, and the call must count against what is current after it.
        body = await request.body()
        region = str(params["location"])
        state = self.regions.get(region)
        if state is None:
            state = self.regions[region] = _RegionState(self.config.behaviour_for(region), arrived)
        if "authorization" in request.headers:
            self.authorization_headers += 1
        try:
            text, prompt_chars = _read_prompt(body)
        except _BadRequest as exc:
            self._record(state, region, arrived, 400, "")
            return google_error(400, str(exc))
        self.calls_by_text[text] += 1

        behaviour = state.behaviour
        if behaviour.capacity is not None and state.in_flight >= behaviour.capacity:
            self._record(state, region, arrived, 429, text)
            return google_error(429, f"{_MESSAGES[429]} (stand-in capacity {behaviour.capacity})")
        if behaviour.rate_per_s is not None and not state.take_token(behaviour.rate_per_s, arrived):
            self._record(state, region, arrived, 429, text)
            return google_error(429, f"{_MESSAGES[429]} (stand-in rate {behaviour.rate_per_s}/s)")

        status = state.script.popleft() if state.script else behaviour.status
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if behaviour.latency_s > 0 and not await _sleep_unless_disconnected(
                request.receive, behaviour.latency_s
            ):
                self._record(state, region, arrived, CLIENT_CLOSED, text)
                return Response(status_code=CLIENT_CLOSED)  # nobody is listening
        finally:
            # Also runs when the task is cancelled (server shutdown), so the slot is freed.
            state.in_flight -= 1

        self._record(state, region, arrived, status, text)
        if status != 200:
            return google_error(status, f"{_MESSAGES[status]} (stand-in: region {region})")
        reply = f"stand-in reply from {region}: {text}"
        return Response(
            _success_body(reply, model, prompt_chars, behaviour.response_bytes),
            headers=_JSON_HEADERS,
        )

    def _record(
        self, state: _RegionState, region: str, arrived: float, status: int, text: str
    ) -> None:
        now = time.monotonic()
        self.total_calls += 1
        state.calls += 1
        state.by_status[status] += 1
        self.call_log.append((arrived - self.started, region, status, text[:200], now - arrived))

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
        """Merge fields into one region's behaviour; a new ``script`` restarts its script."""
        region = str(request.path_params["region"])
        try:
            doc = await _json_body(request)
            behaviour = RegionBehaviour.from_doc(
                doc, base=self.config.behaviour_for(region), where=f"regions.{region}"
            )
        except (ConfigError, _BadRequest) as exc:
            return google_error(400, str(exc))
        self.config = self.config.with_region(region, behaviour)
        state = self.regions.get(region)
        if state is not None:
            state.behaviour = behaviour
            if "script" in doc or "rate_per_s" in doc:
                # Restart only what was changed: a latency tweak mid-script keeps the script.
                remaining = state.script
                state.restart(time.monotonic())
                if "script" not in doc:
                    state.script = remaining
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
            state.calls = 0
            state.by_status.clear()
            state.max_in_flight = state.in_flight
        self._apply_config(self.startup_config)
        return _json(self.config.to_doc())

    async def stats(self, request: Request) -> Response:
        """Return call counts per region and status, and per first user text."""
        return _json(
            {
                "total_calls": self.total_calls,
                "regions": {
                    region: {
                        "calls": state.calls,
                        "by_status": {str(s): n for s, n in sorted(state.by_status.items())},
                        "max_in_flight": state.max_in_flight,
                        "in_flight": state.in_flight,
                    }
                    for region, state in sorted(self.regions.items())
                },
                "calls_by_text": dict(self.calls_by_text),
                "authorization_headers": self.authorization_headers,
            }
        )

    async def calls(self, request: Request) -> Response:
        """Return the call log, oldest first (the last `CALL_LOG_LIMIT` calls)."""
        return _json(
            [
                {"t": t, "region": region, "status": status, "text": text, "latency_s": latency}
                for t, region, status, text, latency in self.call_log
            ]
        )

    def _apply_config(self, config: StandinConfig) -> None:
        self.config = config
        now = time.monotonic()
        for region, state in self.regions.items():
            state.behaviour = config.behaviour_for(region)
            state.restart(now)


class _BadRequest(Exception):
    """The request body is not what the endpoint accepts."""


def _read_prompt(body: bytes) -> tuple[str, int]:
    """Return the first user text and the number of text characters in the request.

    Raises:
        _BadRequest: With a message like Vertex's for the same mistake.
    """
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise _BadRequest(f"Invalid JSON payload received. {exc}") from exc
    if not isinstance(doc, dict):
        raise _BadRequest("Invalid JSON payload received. The body must be a JSON object.")
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
    return first_user_text or "", chars


def _tokens(chars: int) -> int:
    # About four characters per token, as Google's own rule of thumb; only the shape matters.
    return max(1, chars // 4)


def _success_body(reply: str, model: str, prompt_chars: int, response_bytes: int) -> bytes:
    """Render a Vertex-shaped success body, padding ``reply`` to ``response_bytes`` if set."""
    create_time = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    response_id = secrets.token_urlsafe(18)
    prompt_tokens = _tokens(prompt_chars)
    while True:
        reply_tokens = _tokens(len(reply))
        body = json.dumps(
            {
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": reply}]},
                        "finishReason": "STOP",
                        "avgLogprobs": -0.1,
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": reply_tokens,
                    "totalTokenCount": prompt_tokens + reply_tokens,
                },
                "modelVersion": model,
                "createTime": create_time,
                "responseId": response_id,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        missing = response_bytes - len(body)
        if missing <= 0:
            return body
        # "x" needs no escaping, so each one adds one byte; the token counts may grow by a
        # digit, which the next round covers.
        reply += "x" * missing


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


def _json(doc: object, status_code: int = 200) -> Response:
    return Response(
        json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(),
        status_code=status_code,
        headers=_JSON_HEADERS,
    )


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
        A Starlette app serving ``generateContent``, ``/healthz`` and ``/_standin/*``.
    """
    standin = _Standin(config or StandinConfig())
    # The model and its action share one segment ("MODEL:generateContent"): Starlette's
    # str converter matches anything but "/", and the handler splits on the last ":".
    generate_path = (
        "/{version}/projects/{project}/locations/{location}/publishers/google/models/{model_action}"
    )
    routes = [
        Route(generate_path, standin.generate_content, methods=["POST"]),
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
        description="Development stand-in for Vertex AI generateContent (not Vertex).",
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
