"""The job API: submit, read (with long-poll), cancel.

Handlers parse, call one operation of the core and shape the answer; errors they
raise (`HttpError`, or a `DispatcherError` from the core) become responses in the
services' one exception handler (`dispatcher.http.handle_error`).
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dispatcher.auth import KeyRing
from dispatcher.errors import InvalidRequest
from dispatcher.http import HttpError, json_response, read_body
from dispatcher.jobs import Job, JobStatus, is_job_id, rfc3339
from dispatcher.listing import MAX_PAGE_SIZE, list_page, usage_totals
from dispatcher.logs import current_trace
from dispatcher.metrics import JOBS, KEY_JOBS
from dispatcher.runtime import Runtime
from dispatcher.settings import Mode
from dispatcher.submission import Accepted, Submission, Submitter
from dispatcher.tenants import NO_POLICY, TenantGate
from dispatcher.tiers import tier_from_headers
from dispatcher.validation import parse_deadline, parse_request, parse_webhook

log = logging.getLogger("ingress")
MAX_WAIT_S = 60.0


async def submit(request: Request) -> Response:
    """POST /generate: store a pending job, hand it over, answer 202 with its id."""
    accepted = await accept_job(request, model_override=None)
    job = accepted.job
    headers = {"Location": f"/jobs/{job.job_id}"}
    if accepted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(
        {
            "job_id": job.job_id,
            "status": job.status.value,
            "model": job.model,
            "region": job.region,
            "tier": job.tier,
        },
        202,
        headers,
    )


async def job_status(request: Request) -> Response:
    """GET /jobs/{job_id}[?wait=S]: the job, waiting up to S s (≤ 60) for it to finish."""
    runtime: Runtime = request.app.state.runtime
    wait_s = _wait_param(request.query_params.get("wait"))
    job = await find_job(request, request.path_params["job_id"])
    if wait_s and not job.status.is_terminal:
        finished = await runtime.watcher.wait(job.job_id, wait_s)
        job = finished or await find_job(request, job.job_id)
    return json_response(job_view(job))


async def cancel_job(request: Request) -> Response:
    """DELETE /jobs/{job_id}: cancel a job that has not started."""
    runtime: Runtime = request.app.state.runtime
    job = await find_job(request, request.path_params["job_id"])
    current, cancelled = await runtime.manager.cancel(job.job_id)
    if current is None:
        raise HttpError(404, f"no job {job.job_id}")
    if not cancelled:
        raise HttpError(
            409,
            f"job {job.job_id} is {current.status.value}: too late to cancel",
            name="FAILED_PRECONDITION",
        )
    runtime.cache.remember(current)
    log.info("job cancelled", extra={"job_id": job.job_id})
    return json_response(job_view(current))


async def list_jobs(request: Request) -> Response:
    """GET /jobs: the caller's jobs, newest first, a page at a time, with counts by status.

    Query: `status`, `since` (RFC 3339), `page_size` (1-500, default 50), `page_token`
    (the previous page's `next_page_token`). Counts come with the first page only.
    """
    runtime: Runtime = request.app.state.runtime
    params = request.query_params
    raw_status = params.get("status")
    if raw_status is not None and raw_status not in _STATUSES:
        raise HttpError(400, f"status: {raw_status[:32]!r} is not one of {', '.join(_STATUSES)}")
    since = _time_param("since", params.get("since"))
    owner = caller_of(request)
    page = await list_page(
        runtime.manager.store,
        owner=owner,
        status=JobStatus(raw_status) if raw_status else None,
        since=since,
        page_size=_page_size(params.get("page_size")),
        page_token=params.get("page_token"),
    )
    body: dict[str, Any] = {
        "jobs": [job_view(job, with_result=False) for job in page.jobs],
        "next_page_token": page.next_page_token,
    }
    if params.get("page_token") is None:
        counts = await runtime.manager.store.count_by_status(owner, since)
        body["counts"] = {status.value: count for status, count in counts.items()}
    return json_response(body)


async def usage(request: Request) -> Response:
    """GET /usage[?since=T]: the caller's token totals by model and tier that answered."""
    runtime: Runtime = request.app.state.runtime
    since = _time_param("since", request.query_params.get("since"))
    totals, partial = await usage_totals(
        runtime.manager.store, owner=caller_of(request), since=since
    )
    rows = [
        {"model": model, "tier": tier, **counts} for (model, tier), counts in sorted(totals.items())
    ]
    return json_response(
        {"since": rfc3339(since) if since else None, "usage": rows, "partial": partial}
    )


async def my_key(request: Request) -> Response:
    """GET /keys/me: the calling key's policy and what is left of it."""
    keyring: KeyRing | None = request.app.state.keyring
    owner = caller_of(request)
    if keyring is None or owner is None:
        raise HttpError(404, "API keys are off (no API_KEYS_FILE): there is no key to show")
    policy = keyring.current.policy(owner)
    gate: TenantGate = request.app.state.gate
    store = request.app.state.runtime.manager.store
    counts = await store.count_by_status(owner, None)
    return json_response(
        {
            "name": owner,
            "policy": policy.to_doc(),
            "remaining_per_minute": gate.remaining(owner, policy),
            "unfinished": counts[JobStatus.PENDING] + counts[JobStatus.RUNNING],
        }
    )


async def accept_job(request: Request, *, model_override: str | None) -> Accepted:
    """Parse the request and submit it (the rules of entry are in `dispatcher.submission`).

    Args:
        request: The HTTP request; its body is a GenerateContentRequest.
        model_override: The model named by the URL (Vertex-compatible route).

    Returns:
        The job, and whether it is an earlier job replayed for its Idempotency-Key.

    Raises:
        DispatcherError: the request is refused (answered by the services' error handler).
    """
    runtime: Runtime = request.app.state.runtime
    body = parse_request(await read_body(request, runtime.settings.max_request_bytes))
    requested_model = body.pop("model", None)
    if model_override is None:  # POST /generate: the dispatcher's own fields
        tier = body.pop("tier", None)
        deadline = parse_deadline(body.pop("deadline", None), runtime.manager.now())
        fallback = body.pop("fallback", True)
        if not isinstance(fallback, bool):
            raise InvalidRequest("fallback: must be true or false", field="fallback")
        webhook_url = parse_webhook(
            body.pop("webhook", None), allow_hosts=runtime.settings.webhook_allow_hosts
        )
    else:  # the Vertex-compatible route: Vertex's own two headers (the key's webhook only)
        tier, deadline, fallback = tier_from_headers(request.headers), None, True
        webhook_url = None
    submitter: Submitter = request.app.state.submitter
    keyring: KeyRing | None = request.app.state.keyring
    owner = caller_of(request)
    accepted = await submitter.submit(
        Submission(
            request=body,
            model=model_override or requested_model,
            owner=owner,
            # Both checked by the RequestLimits middleware before any handler runs.
            idempotency_key=request.headers.get("idempotency-key"),
            session_id=request.headers.get("x-session-id") or None,
            trace=current_trace.get(),
            tier=tier,
            deadline=deadline,
            fallback=fallback,
            policy=keyring.current.policy(owner) if keyring is not None else NO_POLICY,
            webhook_url=webhook_url,
        )
    )
    if not accepted.replayed:
        JOBS.labels("accepted").inc()
        KEY_JOBS.labels(owner or "", "accepted").inc()
        # One INFO line per job per process: where this process runs the job too (modes
        # 1 and 2), its outcome line follows with the same id and trace, so this one is DEBUG.
        job = accepted.job
        level = logging.INFO if runtime.settings.mode is Mode.PUBSUB else logging.DEBUG
        log.log(
            level,
            "job accepted",
            extra={"job_id": job.job_id, "region": job.region, "model": job.model},
        )
    return accepted


async def find_job(request: Request, job_id: str) -> Job:
    """The caller's job: from the cache when finished, else from the store.

    Raises:
        HttpError: 404 for an unknown id or another caller's job; 503 when the
            store is unreachable.
    """
    runtime: Runtime = request.app.state.runtime
    if not is_job_id(job_id):
        raise HttpError(404, f"no job {job_id[:64]!r}: not a job id")
    job = runtime.cache.get(job_id)
    if job is None:
        job = await runtime.manager.get(job_id)
        if job is None:
            raise HttpError(404, f"no job {job_id}")
        if runtime.settings.mode is not Mode.MEMORY:
            runtime.cache.remember(job)
    if job.owner != caller_of(request):
        # Another caller's job looks exactly like no job: ids cannot be probed.
        raise HttpError(404, f"no job {job_id}")
    return job


def caller_of(request: Request) -> str | None:
    """The authenticated caller's id, set by the API-key middleware; None when keys are off."""
    # Read from the scope: `request.state.caller` raises (and catches) AttributeError
    # on every request when keys are off, a measurable share of a POST's CPU.
    caller = request.scope.get("state", {}).get("caller")
    return caller if isinstance(caller, str) else None


def job_view(job: Job, *, with_result: bool = True) -> dict[str, Any]:
    """The public shape of a job (in listings, without its result)."""
    view: dict[str, Any] = {
        "job_id": job.job_id,
        "status": job.status.value,
        "model": job.model,
        "region": job.region,
        "regions_tried": list(job.regions_tried),
        "attempts": job.attempts,
        "tier": job.tier,
        "tiers_tried": list(job.tiers_tried),
        "models_tried": list(job.models_tried),
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
    }
    if job.deadline is not None:
        view["deadline"] = rfc3339(job.deadline)
    if job.usage is not None:
        view["usage"] = job.usage
    if job.status is JobStatus.SUCCEEDED:
        if with_result:
            view["result"] = job.result
        if job.models_tried and job.tiers_tried:
            view["answered_by"] = {
                "model": job.models_tried[-1],
                "region": job.region,
                "tier": job.tiers_tried[-1],
            }
    elif job.status is JobStatus.FAILED and job.error is not None:
        view["error"] = job.error.to_doc()
    return view


_STATUSES = tuple(status.value for status in JobStatus)
DEFAULT_PAGE_SIZE = 50


def _page_size(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise HttpError(
            400, f"page_size: {raw[:32]!r} is not a whole number from 1 to {MAX_PAGE_SIZE}"
        )
    return int(raw)


def _time_param(name: str, raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise HttpError(400, f"{name}: {raw[:40]!r} is not an RFC 3339 time (2026-12-01T12:00:00Z)")
    return moment.astimezone(UTC)


def _wait_param(raw: str | None) -> float:
    if raw is None:
        return 0.0
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = math.nan
    if not 0 <= wait_s <= 3600:  # also rejects nan
        raise HttpError(400, f"wait: {raw[:32]!r} is not a number of seconds (0 to {MAX_WAIT_S:g})")
    return min(wait_s, MAX_WAIT_S)
