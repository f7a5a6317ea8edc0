"""HTTP helpers both services share: the error shape, bounded body reading, health, metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from dispatcher import logs
from dispatcher.errors import (
    CorruptRecord,
    DispatcherError,
    IdempotencyConflict,
    InvalidRequest,
    JobNotStored,
    Overloaded,
    PublishFailed,
    StoreUnavailable,
)
from dispatcher.status import STATUS_NAMES
from dispatcher.tenants import KeyForbidden, KeyLimited

log = logging.getLogger(__name__)


class BodyTooLarge(InvalidRequest):
    """The body is larger than allowed."""


_TRACE_HEADERS = frozenset({b"x-cloud-trace-context", b"traceparent"})


class TraceMiddleware:
    """Puts each request's Cloud Logging trace in the log context (pure ASGI)."""

    def __init__(self, app: ASGIApp, project: str) -> None:
        self._app = app
        self._project = project

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request with `logs.current_trace` set from its headers."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        # Decode only the two trace headers, not every header of every request.
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _TRACE_HEADERS
        }
        trace = logs.trace_name(headers, self._project) if headers else None
        token = logs.current_trace.set(trace)
        try:
            await self._app(scope, receive, send)
        finally:
            logs.current_trace.reset(token)


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A compact JSON response."""
    return Response(
        json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        status_code=status,
        headers=dict(headers or {}),
        media_type="application/json",
    )


def error_response(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    name: str | None = None,
) -> Response:
    """The documented error shape, also Google's: `{"error": {"code", "status", "message"}}`.

    Args:
        status: The HTTP status (and `code`).
        message: What was wrong, for a person.
        headers: Extra response headers.
        name: The canonical status name, when the default for `status` does not fit.
    """
    body = {
        "error": {
            "code": status,
            "status": name or STATUS_NAMES.get(status, "UNKNOWN"),
            "message": message,
        }
    }
    return json_response(body, status, headers)


class HttpError(Exception):
    """An error to answer in the documented shape; raised inside request handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        self.name = name

    def response(self) -> Response:
        """The error as a response."""
        return error_response(self.status, self.message, self.headers, name=self.name)


def http_error_for(exc: DispatcherError) -> HttpError:
    """The answer to a dispatcher error that reached a handler: the one table of them.

    Errors a caller can cause carry their message to the caller; an unavailable store
    or queue answers 503 with a fixed message (its cause, with internal detail, is
    logged where it happened).
    """
    match exc:
        case BodyTooLarge():
            return HttpError(413, str(exc))
        case InvalidRequest():
            return HttpError(400, str(exc))
        case Overloaded():
            return HttpError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
        case KeyLimited():
            return HttpError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
        case KeyForbidden():
            return HttpError(403, str(exc))
        case IdempotencyConflict():
            return HttpError(409, str(exc), name="ALREADY_EXISTS")
        case JobNotStored():
            return HttpError(503, str(exc))
        case StoreUnavailable():
            return HttpError(503, "the job store is unavailable; try again")
        case PublishFailed():
            return HttpError(503, "the job could not be queued; try again")
        case CorruptRecord():
            log.error("corrupt job record", extra={"reason": str(exc)})
            return HttpError(
                500,
                "the job's record cannot be read; the details are in the service log",
                name="DATA_LOSS",
            )
    log.error("unexpected dispatcher error", exc_info=exc)
    return HttpError(500, "internal error; the details are in the service log")


async def handle_error(request: Request, exc: Exception) -> Response:
    """The services' one exception handler for `HttpError` and `DispatcherError`."""
    if isinstance(exc, HttpError):
        return exc.response()
    assert isinstance(exc, DispatcherError)
    return http_error_for(exc).response()


# Starlette's `exception_handlers` for both services' apps.
ERROR_HANDLERS = {HttpError: handle_error, DispatcherError: handle_error}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes.

    Raises:
        BodyTooLarge: the declared or actual size is over the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return PlainTextResponse("ok")


async def metrics(request: Request) -> Response:
    """GET /metrics: this process's Prometheus metrics (`runtime.registry`), text format."""
    registry = request.app.state.runtime.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug answered in the documented shape, with the traceback in the log only."""
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path[:200]})
    return error_response(500, "internal error; the details are in the service log")
