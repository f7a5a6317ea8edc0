"""The job API: submit, read (with long-poll), cancel.

`accept_job` is the one way a job enters the system; `POST /generate` and the
Vertex-compatible route both use it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dispatcher.errors import (
    InvalidRequest,
    JobExists,
    Overloaded,
    PublishFailed,
    StoreUnavailable,
)
from dispatcher.http import BodyTooLarge, HttpError, json_response, read_body
from dispatcher.jobs import Job, JobError, JobStatus, is_job_id, new_job_id, rfc3339
from dispatcher.logs import current_trace
from dispatcher.metrics import JOBS
from dispatcher.regions import pinned_region, session_region
from dispatcher.runtime import Runtime
from dispatcher.settings import Mode
from dispatcher.validation import MAX_IDEMPOTENCY_KEY_CHARS, MAX_SESSION_ID_CHARS, parse_request

log = logging.getLogger("ingress")
MAX_WAIT_S = 60.0


async def submit(request: Request) -> Response:
    """POST /generate: store a pending job, hand it over, answer 202 with its id."""
    try:
        job, replayed = await accept_job(request, model_override=None)
    except HttpError as exc:
        return exc.response()
    headers = {"Location": f"/jobs/{job.job_id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(
        {
            "job_id": job.job_id,
            "status": job.status.value,
            "model": job.model,
            "region": job.region,
        },
        202,
        headers,
    )


async def job_status(request: Request) -> Response:
    """GET /jobs/{job_id}[?wait=S]: the job, waiting up to S s (≤ 60) for it to finish."""
    runtime: Runtime = request.app.state.runtime
    try:
        wait_s = _wait_param(request.query_params.get("wait"))
        job = await find_job(request, request.path_params["job_id"])
        if wait_s and not job.status.is_terminal:
            finished = await runtime.watcher.wait(job.job_id, wait_s)
            job = finished or await find_job(request, job.job_id)
    except HttpError as exc:
        return exc.response()
    return json_response(job_view(job))


async def cancel_job(request: Request) -> Response:
    """DELETE /jobs/{job_id}: cancel a job that has not started."""
    runtime: Runtime = request.app.state.runtime
    try:
        job = await find_job(request, request.path_params["job_id"])
        current, cancelled = await runtime.manager.cancel(job.job_id)
    except StoreUnavailable:
        return HttpError(503, "the job store is unavailable; try again").response()
    except HttpError as exc:
        return exc.response()
    if current is None:
        return HttpError(404, f"no job {job.job_id}").response()
    if not cancelled:
        return HttpError(
            409,
            f"job {job.job_id} is {current.status.value}: too late to cancel",
            name="FAILED_PRECONDITION",
        ).response()
    runtime.cache.remember(current)
    log.info("job cancelled", extra={"job_id": job.job_id})
    return json_response(job_view(current))


async def accept_job(request: Request, *, model_override: str | None) -> tuple[Job, bool]:
    """Validate, store and dispatch a job from the request.

    Args:
        request: The HTTP request; its body is a GenerateContentRequest.
        model_override: The model named by the URL (Vertex-compatible route).

    Returns:
        The job, and whether it is an earlier job replayed for its Idempotency-Key.

    Raises:
        HttpError: the request is refused (400, 409, 413, 429, 503).
    """
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        body = parse_request(await read_body(request, settings.max_request_bytes))
        if model_override is not None:
            body["model"] = model_override
        model_id, region = _route(runtime, body, request.headers.get("x-session-id"))
        key = _idempotency_key(request)
    except BodyTooLarge as exc:
        raise HttpError(413, str(exc)) from None
    except InvalidRequest as exc:
        raise HttpError(400, str(exc)) from None
    owner = caller_of(request)
    # Only a key can replay a job, so only then is the request's hash needed.
    request_hash = _request_hash(model_id, body) if key else None
    job_id = _idempotent_job_id(owner, key) if key else new_job_id()
    if key:
        earlier = await _get_or_503(runtime, job_id)
        if earlier is not None:
            assert request_hash is not None
            return _replay(earlier, request_hash), True
    assert runtime.queue is not None
    try:
        runtime.queue.admit()
    except Overloaded as exc:
        raise HttpError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
    job = runtime.manager.new_job(
        job_id=job_id,
        model=model_id,
        region=region,
        request=body,
        session_id=request.headers.get("x-session-id"),
        owner=owner,
        idempotency_key=key,
        request_hash=request_hash,
        trace=current_trace.get(),
    )
    try:
        await runtime.manager.store.create(job)
    except JobExists:
        runtime.queue.cancel_admission()
        if request_hash is None:  # a random id already taken: practically never
            raise HttpError(503, "the job could not be stored; try again") from None
        earlier = await _get_or_503(runtime, job_id)
        if earlier is None:  # expired between the two reads: practically never
            raise HttpError(503, "the job could not be stored; try again") from None
        return _replay(earlier, request_hash), True
    except StoreUnavailable as exc:
        runtime.queue.cancel_admission()
        log.error("could not store job", extra={"job_id": job.job_id, "reason": str(exc)})
        raise HttpError(503, "the job could not be stored; nothing was queued, try again") from None
    try:
        await runtime.queue.dispatch(job)
    except PublishFailed as exc:
        runtime.queue.cancel_admission()
        log.error("could not publish job", extra={"job_id": job.job_id, "reason": str(exc)})
        failure = JobError(code=503, status="UNAVAILABLE", message="the job could not be queued")
        try:
            await runtime.manager.fail_pending(job.job_id, failure)
        except StoreUnavailable:
            # The recovery sweep re-publishes it after PUBLISH_GRACE_S: it is not lost,
            # but the client was told it failed, so say so in the log.
            log.error("could not mark unpublished job failed", extra={"job_id": job.job_id})
        raise HttpError(503, "the job could not be queued; try again") from None
    JOBS.labels("accepted").inc()
    # One INFO line per job per process: where this process runs the job too (modes 1
    # and 2), its outcome line follows with the same id and trace, so this one is DEBUG.
    level = logging.INFO if settings.mode is Mode.PUBSUB else logging.DEBUG
    log.log(
        level, "job accepted", extra={"job_id": job.job_id, "region": region, "model": model_id}
    )
    return job, False


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
        job = await _get_or_503(runtime, job_id)
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


def job_view(job: Job) -> dict[str, Any]:
    """The public shape of a job."""
    view: dict[str, Any] = {
        "job_id": job.job_id,
        "status": job.status.value,
        "model": job.model,
        "region": job.region,
        "regions_tried": list(job.regions_tried),
        "attempts": job.attempts,
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
    }
    if job.status is JobStatus.SUCCEEDED:
        view["result"] = job.result
    elif job.status is JobStatus.FAILED and job.error is not None:
        view["error"] = job.error.to_doc()
    return view


async def _get_or_503(runtime: Runtime, job_id: str) -> Job | None:
    try:
        return await runtime.manager.get(job_id)
    except StoreUnavailable:
        raise HttpError(503, "the job store is unavailable; try again") from None


def _replay(earlier: Job, request_hash: str) -> Job:
    if earlier.request_hash != request_hash:
        raise HttpError(
            409,
            "Idempotency-Key was already used with a different request body",
            name="ALREADY_EXISTS",
        )
    return earlier


def _route(runtime: Runtime, body: dict[str, Any], session_id: str | None) -> tuple[str, str]:
    """The model and the region a new job is assigned.

    Raises:
        InvalidRequest: the model is not configured, or the request's context
            cache lives in a region the model is not configured for.
    """
    settings = runtime.settings
    model_id = body.pop("model", None) or settings.model_id
    if not isinstance(model_id, str) or model_id not in settings.models:
        configured = ", ".join(settings.models)
        raise InvalidRequest(f"model: {model_id!r} is not configured (configured: {configured})")
    regions = settings.models[model_id].regions
    pinned = pinned_region(body)
    if pinned is not None:
        if pinned not in regions:
            raise InvalidRequest(
                f"cachedContent: the cache lives in {pinned}, which is not configured for "
                f"{model_id} (regions: {', '.join(regions)})"
            )
        return model_id, pinned
    if session_id:
        if len(session_id) > MAX_SESSION_ID_CHARS:
            raise InvalidRequest(f"X-Session-Id: longer than {MAX_SESSION_ID_CHARS} characters")
        return model_id, session_region(regions, session_id)
    return model_id, runtime.round_robin[model_id].assign_region()


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
            field="Idempotency-Key",
        )
    return key


def _idempotent_job_id(owner: str | None, key: str) -> str:
    """The job id an Idempotency-Key stands for: one per caller and key, 132 bits."""
    digest = hashlib.sha256(f"idempotency\0{owner or ''}\0{key}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


def _request_hash(model_id: str, body: dict[str, Any]) -> str:
    canonical = json.dumps([model_id, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
