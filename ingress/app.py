"""The ingress: accepts generateContent jobs and answers for their status."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.http import (
    ERROR_HANDLERS,
    TraceMiddleware,
    error_response,
    healthz,
    internal_error,
    metrics,
)
from dispatcher.runtime import open_runtime
from dispatcher.settings import Mode, Settings
from dispatcher.submission import Submitter
from ingress.jobs_api import cancel_job, job_status, list_jobs, submit, usage
from ingress.openapi import openapi
from ingress.security import security_middleware
from ingress.vertex_api import vertex_generate

log = logging.getLogger("ingress")
VERTEX_PATH = (
    "/{version}/projects/{project}/locations/{location}/publishers/google/models/{model_action}"
)


def create_app(settings: Settings) -> Starlette:
    """The ingress ASGI app; the runtime opens and closes with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        executes = settings.mode is not Mode.PUBSUB
        async with open_runtime(settings, executes=executes) as runtime:
            app.state.runtime = runtime
            assert runtime.queue is not None
            app.state.submitter = Submitter(
                runtime.manager,
                runtime.queue,
                models=settings.models,
                default_model=settings.model_id,
                round_robin=runtime.round_robin,
            )
            log.info("ingress ready", extra={"mode": settings.mode.value})
            yield

    return Starlette(
        routes=[
            Route("/generate", submit, methods=["POST"]),
            Route("/jobs", list_jobs, methods=["GET"]),
            Route("/usage", usage, methods=["GET"]),
            Route("/jobs/{job_id}", job_status, methods=["GET"]),
            Route("/jobs/{job_id}", cancel_job, methods=["DELETE"]),
            Route(VERTEX_PATH, vertex_generate, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[
            *security_middleware(settings),
            Middleware(TraceMiddleware, project=settings.project),
        ],
        lifespan=lifespan,
        exception_handlers={
            **ERROR_HANDLERS,
            404: _not_found,
            405: _not_allowed,
            Exception: internal_error,
        },
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route {request.method} {request.url.path[:200]}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path[:200]}")
