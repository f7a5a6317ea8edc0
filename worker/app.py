"""The worker: executes jobs that Pub/Sub pushes to it.

Answers 2xx when the job needs nothing more (succeeded, failed for good and
recorded, already finished, or a message that can never be run), and 503 only
when a redelivery should retry it, because every nack slows push delivery for
the whole subscription (https://cloud.google.com/pubsub/docs/push#push_backoff).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dispatcher.errors import InvalidRequest, StoreUnavailable
from dispatcher.executor import RunResult
from dispatcher.http import (
    BodyTooLarge,
    error_response,
    internal_error,
    json_response,
    read_body,
)
from dispatcher.pubsub import parse_push
from dispatcher.runtime import Runtime, open_runtime
from dispatcher.settings import Settings

log = logging.getLogger("worker")
MAX_ENVELOPE_BYTES = 64 * 1024  # the ingress publishes ids, not requests


def create_app(settings: Settings) -> Starlette:
    """The worker ASGI app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_runtime(settings, executes=True) as runtime:
            app.state.runtime = runtime
            log.info("worker ready", extra={"mode": settings.mode.value})
            yield

    return Starlette(
        routes=[
            Route("/", push, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={Exception: internal_error},
    )


async def push(request: Request) -> Response:
    """POST /: one Pub/Sub push delivery."""
    runtime: Runtime = request.app.state.runtime
    assert runtime.executor is not None
    try:
        envelope = json.loads(await read_body(request, MAX_ENVELOPE_BYTES))
        delivery = parse_push(envelope)
    except (BodyTooLarge, InvalidRequest, ValueError) as exc:
        # Redelivering a message that can never be read would loop forever: ack it.
        log.error("malformed push request acknowledged", extra={"reason": str(exc)[:300]})
        return json_response({"acknowledged": True, "reason": str(exc)[:300]}, 200)
    try:
        outcome = await runtime.executor.run(
            delivery.job_id, delivery_attempt=delivery.delivery_attempt
        )
    except StoreUnavailable as exc:
        log.error("job store unavailable", extra={"job_id": delivery.job_id, "reason": str(exc)})
        return error_response(503, "job store unavailable; redeliver later")
    status = outcome.job.status.value if outcome.job else "missing"
    if outcome.result is RunResult.RETRY:
        return error_response(
            503,
            f"job {delivery.job_id} not finished ({status}); redeliver later",
            {"Retry-After": str(int(outcome.retry_after_s) or 1)},
        )
    return json_response({"job_id": delivery.job_id, "status": status}, 200)


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return PlainTextResponse("ok")
