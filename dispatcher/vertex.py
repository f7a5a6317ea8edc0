"""The Vertex AI client and its retries: every Vertex call of the project is in this file.

One call is a POST to the regional `generateContent` endpoint
(https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/inference).
Transient failures (429, 500, 502, 503, 504, timeouts, connection errors) are
retried with exponential backoff and jitter, each retry in the next healthy
region (the `RegionPool` decides); other errors end the job at once with
Vertex's own code, status and message.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)
from yarl import URL

from dispatcher.errors import DispatcherError, RegionsBusy
from dispatcher.fairness import DEFAULT_SHARE, Share
from dispatcher.jobs import JobError, JsonObject
from dispatcher.metrics import KEY_QUEUE_WAIT, UPSTREAM_CALLS, UPSTREAM_LATENCY
from dispatcher.regions import Outcome, RegionPool
from dispatcher.settings import Tier
from dispatcher.status import status_name
from dispatcher.tiers import HEADERS, lane, lane_parts

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TRANSIENT_CODES = frozenset({429, 500, 502, 503, 504})


class VertexError(DispatcherError):
    """Vertex AI answered with an error, or could not be reached."""

    def __init__(self, error: JobError, *, region: str) -> None:
        self.error = error
        self.region = region
        super().__init__(f"{region}: {error.code} {error.status}: {error.message}")

    @property
    def transient(self) -> bool:
        """Whether trying again (elsewhere, later) may succeed."""
        return self.error.code in TRANSIENT_CODES


def is_transient(exc: BaseException) -> bool:
    """The retry predicate: only Vertex errors that a retry can fix."""
    return isinstance(exc, VertexError) and exc.transient


def health_outcome(exc: VertexError | None) -> Outcome:
    """What a call's ending says about its region."""
    if exc is None:
        return Outcome.SUCCESS
    if exc.error.code == 429:
        return Outcome.OVERLOADED
    if exc.transient:
        return Outcome.FAILED
    return Outcome.NEUTRAL


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How hard one execution tries (from settings)."""

    max_retries: int
    backoff_initial_s: float
    backoff_max_s: float
    attempt_timeout_s: float
    budget_s: float  # all attempts end within this (kept well inside the push ack deadline)


@dataclass(frozen=True, kw_only=True, slots=True)
class CallReport:
    """What one execution did: calls made and the regions they went to, in order."""

    regions: tuple[str, ...]
    response: JsonObject | None = None
    error: VertexError | None = None

    @property
    def calls(self) -> int:
        """Vertex calls made."""
        return len(self.regions)


class Credentials:
    """Google credentials, loaded and refreshed off the event loop, one refresh at a time."""

    def __init__(self) -> None:
        self._credentials: Any = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid access token.

        Raises:
            VertexError: credentials could not be found or refreshed (401, permanent).
        """
        creds = self._credentials
        if creds is not None and creds.valid:
            return str(creds.token)
        async with self._lock:
            try:
                return await asyncio.to_thread(self._refresh)
            except Exception as exc:  # google.auth raises several unrelated types
                raise VertexError(
                    JobError(
                        code=401,
                        status="UNAUTHENTICATED",
                        message=f"could not obtain Google credentials: {exc}",
                    ),
                    region="-",
                ) from exc

    def _refresh(self) -> str:
        import google.auth
        import google.auth.transport.requests

        if self._credentials is None:
            self._credentials, _ = google.auth.default(scopes=list(SCOPES))
        if not self._credentials.valid:
            self._credentials.refresh(google.auth.transport.requests.Request())
        return str(self._credentials.token)


def http_session(*, connect_timeout_s: float = 10.0) -> aiohttp.ClientSession:
    """The process's HTTP session for Vertex calls (create it on the running loop).

    aiohttp directly: at load, httpx's request building (URL parsing, header
    merging, cookies) cost about as much CPU as aiohttp's whole call beneath it
    (BENCHMARKS.md, profiles). Each attempt's own deadline is `asyncio.timeout`.
    No limit on connections (aiohttp's default is 100): the regions' adaptive limits
    bound the calls in flight, and a pool limit below them would hold calls in the
    client while their region slots sat idle.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        trust_env=False,
    )


class VertexClient:
    """Calls generateContent in a chosen region, with retries across regions."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        project: str,
        pool: RegionPool,
        policy: RetryPolicy,
        endpoint: str | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """Create a client.

        Args:
            http: The process's shared HTTP session (`http_session`).
            project: The project in the endpoint path.
            pool: Region health and concurrency.
            policy: Retry limits.
            endpoint: Base URL replacing every regional host (a stand-in, a proxy).
            credentials: Source of tokens; None sends no Authorization header
                (always the case for a plain-http endpoint).
        """
        self._http = http
        self._project = project
        self._pool = pool
        self._policy = policy
        self._endpoint = endpoint
        self._credentials = credentials
        self._urls: dict[tuple[str, str], URL] = {}
        # Exponential from the initial delay, capped, plus up to one initial delay of jitter.
        self._backoff = wait_exponential(
            multiplier=policy.backoff_initial_s, max=policy.backoff_max_s
        ) + wait_random(0, policy.backoff_initial_s)
        self._retry = retry_if_exception(is_transient)  # built once: cheaper than per call

    def url_for(self, model: str, region: str) -> str:
        """The generateContent URL of `model` in `region`."""
        if self._endpoint:
            base = self._endpoint
        elif region == "global":
            base = "https://aiplatform.googleapis.com"
        else:
            base = f"https://{region}-aiplatform.googleapis.com"
        path = f"/v1/projects/{self._project}/locations/{region}/publishers/google/models/{model}"
        return f"{base}{path}:generateContent"

    async def generate(
        self,
        *,
        model: str,
        request: JsonObject,
        regions: Sequence[str],
        preferred: str,
        tried: list[str] | None = None,
        tier: Tier = Tier.STANDARD,
        budget_s: float | None = None,
        share: Share = DEFAULT_SHARE,
    ) -> CallReport:
        """Call generateContent, retrying transient failures in the next healthy region.

        Args:
            model: The model id.
            request: The GenerateContentRequest, sent as given.
            regions: Regions allowed for this job, in round-robin order.
            preferred: The job's assigned region; tried first while healthy.
            tried: Receives each lane (`tiers.lane`: region and tier) as it is called,
                so a caller that is cancelled mid-way still knows what was spent.
            tier: The consumption tier: the headers sent and the lanes learned.
            budget_s: At most this long in all (a deadline), under the policy's budget.
            share: Whose call it is (the fair order of calls waiting for a slot).

        Returns:
            The report: the response, or the last error, and every lane called.
        """
        # REGION_STRATEGY=naive keeps every retry in the job's region (the benchmark baseline).
        first = preferred if preferred in regions else regions[0]
        rotated = _rotate(regions, first) if self._pool.retries_move else [first]
        order = [lane(region, tier) for region in rotated]
        tried = [] if tried is None else tried
        started = time.monotonic()
        budget_s = (
            self._policy.budget_s if budget_s is None else min(budget_s, self._policy.budget_s)
        )
        give_up_at = started + budget_s
        try:
            response = await self._call_once(model, request, order, tried, give_up_at, share)
            return CallReport(regions=tuple(tried), response=response)
        except VertexError as exc:
            if not exc.transient or self._policy.max_retries == 0:
                return CallReport(regions=tuple(tried), error=exc)
            first_failure = exc

        def wait(state: RetryCallState) -> float:
            # The backoff protects a region, not the job: moving to another region
            # needs no pause, coming back to one already tried does.
            if len(set(tried)) < len(order):
                return 0.0
            return float(self._backoff(state))

        # Only a failed first call builds the retry machinery: each use of AsyncRetrying
        # leaves ~50 objects in reference cycles for the garbage collector, and most
        # calls succeed at once. Tenacity's attempt 1 is the call already made, so it
        # counts it and waits after it exactly as if it had made it.
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._policy.max_retries + 1)
            | stop_before_delay(budget_s - (time.monotonic() - started)),
            wait=wait,
            retry=self._retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise first_failure
                    response = await self._call_once(
                        model, request, order, tried, give_up_at, share
                    )
                    return CallReport(regions=tuple(tried), response=response)
        except VertexError as exc:
            return CallReport(regions=tuple(tried), error=exc)
        raise AssertionError("unreachable: tenacity either returns or reraises")  # pragma: no cover

    async def _call_once(
        self,
        model: str,
        request: JsonObject,
        order: Sequence[str],
        tried: list[str],
        give_up_at: float,
        share: Share,
    ) -> JsonObject:
        waiting_since = time.monotonic()
        remaining_s = give_up_at - waiting_since
        try:
            slot = await self._pool.acquire(
                order,
                avoid=tried,
                deadline_s=None if math.isinf(remaining_s) else remaining_s,
                share=share,
            )
        except RegionsBusy as exc:
            # No call was made: a transient failure, so the job is given back for later.
            error = JobError(code=429, status="RESOURCE_EXHAUSTED", message=f"{exc}; not called")
            raise VertexError(error, region=order[0]) from None
        KEY_QUEUE_WAIT.labels(share.tenant, "batch" if share.batch else "interactive").observe(
            time.monotonic() - waiting_since
        )
        tried.append(slot.region)
        failure: VertexError | None = None
        started = time.perf_counter()
        try:
            return await self._post(model, slot.region, request, give_up_at)
        except VertexError as exc:
            failure = exc
            raise
        finally:
            UPSTREAM_LATENCY.labels(slot.region).observe(time.perf_counter() - started)
            outcome = "200" if failure is None else str(failure.error.code)
            UPSTREAM_CALLS.labels(slot.region, outcome).inc()
            self._pool.release(slot, health_outcome(failure))

    async def _post(
        self, model: str, lane_key: str, request: JsonObject, give_up_at: float
    ) -> JsonObject:
        region, tier = lane_parts(lane_key)
        headers = {"Content-Type": "application/json", **HEADERS[tier]}
        if self._credentials is not None:
            headers["Authorization"] = f"Bearer {await self._credentials.token()}"
        url = self._urls.get((model, region))
        if url is None:
            url = self._urls[model, region] = URL(self.url_for(model, region))
        body = json.dumps(request, separators=(",", ":")).encode()
        timeout_s = max(0.001, min(self._policy.attempt_timeout_s, give_up_at - time.monotonic()))
        try:
            async with (
                asyncio.timeout(timeout_s),
                self._http.post(url, data=body, headers=headers) as response,
            ):
                status, reason, payload = response.status, response.reason, await response.read()
        except TimeoutError:
            raise VertexError(
                JobError(
                    code=504,
                    status="DEADLINE_EXCEEDED",
                    message=f"no answer within {timeout_s:.3g} s",
                ),
                region=region,
            ) from None
        except aiohttp.ClientError as exc:
            raise VertexError(
                JobError(code=503, status="UNAVAILABLE", message=f"connection failed: {exc!r}"),
                region=region,
            ) from exc
        if status >= 300:
            raise VertexError(_google_error(status, reason, payload), region=region)
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise VertexError(
                JobError(code=502, status="UNAVAILABLE", message="response is not a JSON object"),
                region=region,
            )
        return answer


def _google_error(code: int, reason: str | None, payload: bytes) -> JobError:
    """Vertex's own error from its body (`{"error": {"code", "status", "message"}}`)."""
    status = status_name(code)
    message = reason or "error"
    try:
        detail = json.loads(payload).get("error", {})
    except (ValueError, AttributeError):
        detail = {}
    if isinstance(detail, dict):
        status = str(detail.get("status") or status)
        message = str(detail.get("message") or message)
    return JobError(code=code, status=status, message=message)


def _rotate(regions: Sequence[str], first: str) -> list[str]:
    """`regions` in their order, starting at `first` (kept first even if not listed)."""
    if first not in regions:
        return [first]
    index = list(regions).index(first)
    return [*regions[index:], *regions[:index]]
