"""The ingress: accepts generateContent jobs and answers for their status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from datetime import datetime

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.auth import KeyRing
from dispatcher.http import (
    ERROR_HANDLERS,
    TraceMiddleware,
    error_response,
    healthz,
    internal_error,
    metrics,
)
from dispatcher.jobs import JobStatus
from dispatcher.listing import usage_totals
from dispatcher.runtime import Runtime, open_runtime
from dispatcher.settings import Mode, Settings
from dispatcher.submission import Submitter
from dispatcher.tenants import TenantGate
from ingress.jobs_api import cancel_job, job_status, list_jobs, my_key, submit, usage
from ingress.openapi import openapi
from ingress.security import security_middleware
from ingress.vertex_api import vertex_generate

log = logging.getLogger("ingress")
VERTEX_PATH = (
    "/{version}/projects/{project}/locations/{location}/publishers/google/models/{model_action}"
)


def create_app(settings: Settings) -> Starlette:
    """The ingress ASGI app; the runtime opens and closes with the app's lifespan.

    Raises:
        ConfigError: API_KEYS_FILE cannot be read or is malformed (read here, at start-up).
    """
    keyring = KeyRing.load(settings.api_keys_file) if settings.api_keys_file else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        executes = settings.mode is not Mode.PUBSUB
        async with contextlib.AsyncExitStack() as stack:
            runtime = await stack.enter_async_context(open_runtime(settings, executes=executes))
            app.state.runtime = runtime
            assert runtime.queue is not None
            app.state.gate = tenant_gate(runtime)
            app.state.submitter = Submitter(
                runtime.manager,
                runtime.queue,
                models=settings.models,
                default_model=settings.model_id,
                round_robin=runtime.round_robin,
                gate=app.state.gate,
            )
            if keyring is not None:
                reload_on_sighup(stack, keyring)
            log.info("ingress ready", extra={"mode": settings.mode.value})
            yield

    app = Starlette(
        routes=[
            Route("/generate", submit, methods=["POST"]),
            Route("/jobs", list_jobs, methods=["GET"]),
            Route("/usage", usage, methods=["GET"]),
            Route("/keys/me", my_key, methods=["GET"]),
            Route("/jobs/{job_id}", job_status, methods=["GET"]),
            Route("/jobs/{job_id}", cancel_job, methods=["DELETE"]),
            Route(VERTEX_PATH, vertex_generate, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[
            *security_middleware(settings, keyring),
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
    app.state.keyring = keyring
    return app


def tenant_gate(runtime: Runtime) -> TenantGate:
    """The per-key gate over this runtime's store and its count of instances."""
    store = runtime.manager.store

    async def unfinished(owner: str) -> int:
        counts = await store.count_by_status(owner, None)
        return counts[JobStatus.PENDING] + counts[JobStatus.RUNNING]

    async def tokens_since(owner: str, since: datetime) -> int:
        totals, _ = await usage_totals(store, owner=owner, since=since)
        return sum(row["total"] for row in totals.values())

    board = runtime.board
    return TenantGate(
        instances=lambda: board.instances if board is not None else 1,
        unfinished=unfinished,
        tokens_since=tokens_since,
    )


def reload_on_sighup(stack: contextlib.AsyncExitStack, keyring: KeyRing) -> None:
    """Re-read the keys file on SIGHUP, for as long as the stack is open."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
        loop.add_signal_handler(signal.SIGHUP, keyring.reload)
        stack.callback(loop.remove_signal_handler, signal.SIGHUP)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, f"no route {request.method} {request.url.path[:200]}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error_response(405, f"{request.method} is not allowed on {request.url.path[:200]}")
