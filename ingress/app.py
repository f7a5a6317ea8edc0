"""The ingress: accepts generateContent jobs and answers for their status."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dispatcher.errors import (
    InvalidRequest,
    JobExists,
    Overloaded,
    PublishFailed,
    StoreUnavailable,
)
from dispatcher.http import (
    BodyTooLarge,
    error_response,
    internal_error,
    json_response,
    read_body,
)
from dispatcher.jobs import Job, JobError, JobStatus, is_job_id, new_job_id, rfc3339
from dispatcher.regions import pinned_region, session_region
from dispatcher.runtime import Runtime, open_runtime
from dispatcher.settings import Mode, Settings
from dispatcher.validation import parse_request

log = logging.getLogger("ingress")
MAX_SESSION_ID = 128


def create_app(settings: Settings) -> Starlette:
    """The ingress ASGI app; the runtime opens and closes with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        executes = settings.mode is not Mode.PUBSUB
        async with open_runtime(settings, executes=executes) as runtime:
            app.state.runtime = runtime
            log.info("ingress ready", extra={"mode": settings.mode.value})
            yield

    return Starlette(
        routes=[
            Route("/generate", submit, methods=["POST"]),
            Route("/jobs/{job_id}", job_status, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_allowed, Exception: internal_error},
    )


async def submit(request: Request) -> Response:
    """POST /generate: store a pending job, hand it over, answer 202 with its id."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    try:
        body = parse_request(await read_body(request, settings.max_request_bytes))
        model_id, region = _route(runtime, body, request.headers.get("x-session-id"))
    except BodyTooLarge as exc:
        return error_response(413, str(exc))
    except InvalidRequest as exc:
        return error_response(400, str(exc))
    assert runtime.queue is not None
    try:
        runtime.queue.admit()
    except Overloaded as exc:
        return error_response(429, str(exc), {"Retry-After": str(exc.retry_after_s)})
    job = runtime.manager.new_job(
        job_id=new_job_id(),
        model=model_id,
        region=region,
        request=body,
        session_id=request.headers.get("x-session-id"),
        owner=caller_of(request),
    )
    try:
        await runtime.manager.store.create(job)
    except (StoreUnavailable, JobExists) as exc:
        runtime.queue.cancel_admission()
        log.error("could not store job", extra={"job_id": job.job_id, "reason": str(exc)})
        return error_response(503, "the job could not be stored; nothing was queued, try again")
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
        return error_response(503, "the job could not be queued; try again")
    log.info("job accepted", extra={"job_id": job.job_id, "region": region, "model": model_id})
    return json_response(
        {"job_id": job.job_id, "status": job.status.value, "model": job.model, "region": region},
        202,
        {"Location": f"/jobs/{job.job_id}"},
    )


async def job_status(request: Request) -> Response:
    """GET /jobs/{job_id}: the job's state, with its result or error once finished."""
    runtime: Runtime = request.app.state.runtime
    job_id = request.path_params["job_id"]
    if not is_job_id(job_id):
        return error_response(404, f"no job {job_id[:64]!r}: not a job id")
    job = runtime.cache.get(job_id)
    if job is None:
        try:
            job = await runtime.manager.get(job_id)
        except StoreUnavailable:
            return error_response(503, "the job store is unavailable; try again")
        if job is None:
            return error_response(404, f"no job {job_id}")
        if runtime.settings.mode is not Mode.MEMORY:
            runtime.cache.remember(job)
    if job.owner != caller_of(request):
        # Another caller's job looks exactly like no job: ids cannot be probed.
        return error_response(404, f"no job {job_id}")
    return json_response(job_view(job))


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return PlainTextResponse("ok")


def caller_of(request: Request) -> str | None:
    """The authenticated caller's id, set by the API-key middleware; None when keys are off."""
    caller = getattr(request.state, "caller", None)
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
        if len(session_id) > MAX_SESSION_ID:
            raise InvalidRequest(f"X-Session-Id: longer than {MAX_SESSION_ID} characters")
        return model_id, session_region(regions, session_id)
    return model_id, runtime.round_robin[model_id].assign_region()


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route {request.method} {request.url.path[:200]}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path[:200]}")
