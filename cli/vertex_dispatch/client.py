"""The ingress's HTTP API as the client uses it: connection, retries, long polls.

Every HTTP call of the client is in this module. Retries are bounded and only for answers
that are named: 429 (by time, after its ``Retry-After``), 502-504 and connection errors (by
count, with backoff); httpx's exceptions end here as ``Unreachable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from vertex_dispatch import PROG
from vertex_dispatch.errors import ApiError, CliError, Stopped, Unreachable, describe_error
from vertex_dispatch.report import format_duration

TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
"""Job statuses that never change again (the ingress's job model; a unit test compares)."""

RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})
"""Answers worth another try: backpressure (429, 503) and a front end's gateway errors."""
MAX_SERVER_WAIT_S: Final = 60.0
"""The ingress caps ``GET /jobs/{id}?wait=`` at 60 s."""
POLL_INITIAL_S: Final = 0.1
POLL_MAX_S: Final = 2.0
BACKOFF_INITIAL_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
RETRY_AFTER_MAX_S: Final = 120.0
RETRY_MIN_S: Final = 0.25
DEFAULT_MAX_RETRIES: Final = 6
BUSY_PATIENCE_S: Final = 600.0
"""How long one request keeps coming back after 429s: the ingress asked for the wait, the
line has not failed, so it is not bounded by ``--max-retries``."""
CONNECT_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 30.0
"""Read timeout beyond the long-poll wait."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Connection:
    """Where the ingress is and how to authenticate to it.

    Attributes:
        url: Base URL without a trailing slash.
        headers: Headers sent with every request (``Authorization`` when a key or token is set).
        max_retries: Retries of one request on 502-504 and connection errors (a 429 is
            retried for up to ``BUSY_PATIENCE_S``).
    """

    url: str
    headers: Mapping[str, str]
    max_retries: int = DEFAULT_MAX_RETRIES


def base_url(text: str) -> str:
    """Check a base URL and drop its trailing slashes.

    Raises:
        CliError: It is not an http:// or https:// URL.
    """
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise CliError(
            f"--url / DISPATCHER_URL: expected http(s)://HOST[:PORT][/PATH], got {text!r}"
        )
    return url


def auth_headers(*, api_key: str | None, id_token: str | None) -> dict[str, str]:
    """The headers that carry an API key and/or a Cloud Run IAM identity token.

    A key alone goes in ``Authorization: Bearer``. With a token, the token needs
    ``Authorization`` (Cloud Run's IAM check reads it), so the key goes in ``X-API-Key``,
    which the ingress reads first (``ingress/security.py``).
    """
    headers: dict[str, str] = {}
    if id_token:
        headers["Authorization"] = f"Bearer {id_token}"
        if api_key:
            headers["X-API-Key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3).

    Returns:
        The delay (0 or more), or None when the header is missing or unreadable.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def retry_delay(attempt: int, retry_after: float | None, *, jitter: float) -> float:
    """How long to wait before retry number ``attempt + 1``.

    Args:
        attempt: Retries made so far (0 for the first retry).
        retry_after: The server's ``Retry-After`` in seconds, honoured when given (at least
            ``RETRY_MIN_S``, so ``Retry-After: 0`` cannot make a tight loop; at most 120 s).
        jitter: A factor in [0, 1) spreading clients apart; the backoff is scaled into
            [50 %, 100 %) of itself.

    Returns:
        Seconds to sleep.
    """
    if retry_after is not None:
        return min(max(retry_after, RETRY_MIN_S), RETRY_AFTER_MAX_S)
    backoff = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0**attempt)
    return backoff * (0.5 + jitter / 2)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The ``{"code", "status", "message"}`` of an error answer, even one not from the ingress."""
    with contextlib.suppress(ValueError):
        error = response.json().get("error")
        if isinstance(error, dict):
            return error
    return {
        "code": response.status_code,
        "status": response.reason_phrase.upper().replace(" ", "_") or None,
        "message": response.text[:200].strip() or None,
    }


def unreachable_error(exc: Unreachable) -> dict[str, Any]:
    """The ``error`` of a line whose request never got an answer."""
    return {"code": None, "status": "UNAVAILABLE", "message": str(exc)}


def accepted_job_id(response: httpx.Response) -> str | None:
    """The ``job_id`` of a 202 answer; None when the body has none."""
    try:
        document = response.json()
    except ValueError:
        return None
    job_id = document.get("job_id") if isinstance(document, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


def _describe_transport(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _user_agent() -> str:
    try:
        version = metadata.version("vertex-dispatcher-cli")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"{PROG}/{version}"


def open_http_client(
    connection: Connection, *, concurrency: int, wait_s: float
) -> httpx.AsyncClient:
    """The one HTTP client of a command, with timeouts that fit a long poll."""
    return httpx.AsyncClient(
        headers={"User-Agent": _user_agent(), **connection.headers},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=httpx.Timeout(
            REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=wait_s + REQUEST_TIMEOUT_S
        ),
    )


class IngressClient:
    """The ingress's two endpoints, with bounded retries on 429, 502-504 and connection errors.

    A request that gets a 429 waits its ``Retry-After`` and tries again, for up to
    ``BUSY_PATIENCE_S``; the other requests go on meanwhile. (Holding back every submission
    after one 429 was measured 3x slower against an ingress at ``MAX_PENDING_JOBS``: slots
    freed by finished jobs stayed idle.)
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        connection: Connection,
        *,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.http = http
        self.url = connection.url
        self.max_retries = connection.max_retries
        self.on_retry = on_retry

    async def submit(
        self,
        request: Mapping[str, Any],
        *,
        key: str,
        stop: asyncio.Event | None = None,
    ) -> httpx.Response:
        """``POST /generate`` with an ``Idempotency-Key``, so a retry finds the same job.

        Raises:
            Unreachable: Connection errors through every retry.
            Stopped: ``stop`` was set while waiting to retry.
        """
        return await self._send(
            "POST",
            "/generate",
            json=request,
            headers={"Idempotency-Key": key},
            stop=stop,
        )

    async def job(self, job_id: str, *, wait_s: float | None) -> dict[str, Any]:
        """``GET /jobs/{job_id}[?wait=S]``.

        Returns:
            The job's view.

        Raises:
            ApiError: Any answer but 200 (after retries).
            Unreachable: Connection errors through every retry.
        """
        params = {"wait": f"{wait_s:g}"} if wait_s else None
        what = f"GET /jobs/{job_id}"
        response = await self._send("GET", f"/jobs/{job_id}", params=params)
        if response.status_code != 200:
            raise ApiError(what, response.status_code, error_of(response))
        try:
            view = response.json()
        except ValueError:
            view = None
        if not isinstance(view, dict) or not isinstance(view.get("status"), str):
            raise ApiError(what, 200, {"message": f"not a job view: {response.text[:200]!r}"})
        return view

    async def _send(
        self,
        method: str,
        path: str,
        *,
        stop: asyncio.Event | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        failures = 0  # 502-504 and connection errors: at most max_retries
        busy = 0  # 429s: retried while the ingress's Retry-After delays fit the patience
        busy_waited = 0.0
        while True:
            try:
                response = await self.http.request(method, self.url + path, **kwargs)
            except httpx.TransportError as exc:
                problem = _describe_transport(exc)
                if failures >= self.max_retries:
                    raise Unreachable(
                        f"{method} {self.url}{path}: {problem} (after {failures + 1} tries)"
                    ) from exc
                delay = retry_delay(failures, None, jitter=random.random())  # noqa: S311 - jitter, not secrecy
                failures += 1
                retry = f"retry {failures} of {self.max_retries}"
            else:
                code = response.status_code
                if code not in RETRYABLE_STATUS:
                    return response
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                problem = describe_error(error_of(response))
                if code == 429:
                    delay = retry_delay(busy, retry_after, jitter=random.random())  # noqa: S311
                    if busy_waited + delay > BUSY_PATIENCE_S:
                        return response
                    busy, busy_waited = busy + 1, busy_waited + delay
                    retry = f"busy for {format_duration(busy_waited)} so far"
                else:
                    if failures >= self.max_retries:
                        return response
                    delay = retry_delay(failures, retry_after, jitter=random.random())  # noqa: S311
                    failures += 1
                    retry = f"retry {failures} of {self.max_retries}"
            if self.on_retry is not None:
                self.on_retry(f"{method} {path}: {problem}; {retry}, next in {delay:.1f} s")
            await _sleep_unless(delay, stop)


async def _sleep_unless(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep, or raise ``Stopped`` as soon as ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    if stop.is_set():
        raise Stopped
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    if stop.is_set():
        raise Stopped


async def wait_for_job(
    client: IngressClient,
    job_id: str,
    *,
    wait_s: float,
    timeout_s: float | None = None,
    on_view: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Follow a job until it is finished (or ``timeout_s`` has passed).

    Each request long-polls for ``wait_s``; when the ingress answers early with a job that
    is not finished (an ingress that ignores ``?wait``), the next poll waits a little,
    growing from 0.1 s to 2 s, so this is never a busy loop.

    Returns:
        The last view.

    Raises:
        ApiError: The ingress answered with an error.
        Unreachable: It could not be reached.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = POLL_INITIAL_S
    while True:
        ask = min(wait_s, MAX_SERVER_WAIT_S)
        if deadline is not None:
            ask = max(0.0, min(ask, deadline - time.monotonic()))
        asked_at = time.monotonic()
        view = await client.job(job_id, wait_s=ask)
        if on_view is not None:
            on_view(view)
        if view["status"] in TERMINAL:
            return view
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return view
        if ask <= 0 or now - asked_at < ask / 2:  # answered early: this ingress ignores ?wait
            await asyncio.sleep(pause if deadline is None else min(pause, deadline - now))
            pause = min(pause * 1.5, POLL_MAX_S)
