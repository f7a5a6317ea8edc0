"""The ingress's outer guards (pure ASGI middleware): request limits and API keys.

They run before routing, so a request that is too large in its head, or that
carries no valid key, never reaches a handler, the store or the queue; both
answer in the documented error shape.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from dispatcher.auth import ApiKeyStore, KeyRing, bearer_token
from dispatcher.errors import InvalidRequest
from dispatcher.http import error_response
from dispatcher.settings import Settings
from dispatcher.validation import check_headers

log = logging.getLogger("ingress")

# uvicorn's httptools parser sets no limit of its own on header sizes; these are
# generous for every real client (browsers cap a URL near 2-8 KiB) and small
# enough that no header can cost the process much.
MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 2048
MAX_HEADER_BYTES = 8 * 1024  # one header, name and value
MAX_HEADERS_BYTES = 32 * 1024  # all of them
MAX_HEADER_COUNT = 100
# Reachable without a key: the health check (Cloud Run, load balancers) and the
# API description, which is public in the repository anyway.
OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})
API_KEY_HEADER = "x-api-key"


def security_middleware(settings: Settings, keyring: KeyRing | None = None) -> list[Middleware]:
    """The ingress's guards, outermost first: limits, then API keys when configured.

    Called once while the app is built at start-up: that is when `API_KEYS_FILE` is read.

    Raises:
        ConfigError: naming API_KEYS_FILE, when the file cannot be read or is malformed.
    """
    middleware = [Middleware(RequestLimits)]
    if keyring is None and settings.api_keys_file is not None:
        keyring = KeyRing.load(settings.api_keys_file)
    if keyring is not None:
        middleware.append(Middleware(ApiKeyAuth, keys=keyring))
    return middleware


class RequestLimits:
    """Refuses oversized paths (414), query strings (414) and headers (431).

    Also checks the headers whose values are stored with a job (X-Session-Id,
    Idempotency-Key) on every route, so no handler can store an unchecked one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a refusal, or pass the request on untouched."""
        if scope["type"] == "http":
            refusal = _limit_refusal(scope)
            if refusal is not None:
                status, message = refusal
                await error_response(status, message)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _limit_refusal(scope: Scope) -> tuple[int, str] | None:
    """(status, message) for a request over a limit, None if within them."""
    path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    if len(path) > MAX_PATH_BYTES:
        return 414, f"path of {len(path)} bytes is over {MAX_PATH_BYTES}"
    query = scope.get("query_string", b"")
    if len(query) > MAX_QUERY_BYTES:
        return 414, f"query string of {len(query)} bytes is over {MAX_QUERY_BYTES}"
    raw_headers = scope["headers"]
    if len(raw_headers) > MAX_HEADER_COUNT:
        return 431, f"{len(raw_headers)} headers; at most {MAX_HEADER_COUNT}"
    total = 0
    for name, value in raw_headers:
        size = len(name) + len(value)
        total += size
        if size > MAX_HEADER_BYTES:
            shown = name.decode("latin-1")[:64]
            return 431, f"header {shown} is over {MAX_HEADER_BYTES} bytes"
    if total > MAX_HEADERS_BYTES:
        return 431, f"headers total over {MAX_HEADERS_BYTES} bytes"
    try:
        check_headers(Headers(scope=scope))
    except InvalidRequest as exc:
        return 400, str(exc)
    return None


class ApiKeyAuth:
    """Requires an API key (`X-API-Key: KEY` or `Authorization: Bearer KEY`).

    The key's name becomes `scope["state"]["caller"]` (what `request.state.caller`
    reads): jobs belong to it, and another caller's job reads as 404. X-API-Key is
    looked at first, because behind Cloud Run IAM `Authorization` carries Google's
    ID token, not the key.
    """

    def __init__(self, app: ASGIApp, *, keys: ApiKeyStore | KeyRing) -> None:
        self._app = app
        self._keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Set the caller and pass the request on, or answer 401."""
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        presented = headers.get(API_KEY_HEADER) or bearer_token(headers.get("authorization"))
        keys = self._keys.current if isinstance(self._keys, KeyRing) else self._keys
        caller = keys.identify(presented) if presented else None
        if caller is None:
            reason = "unknown API key" if presented else "missing API key"
            # The key itself is never logged, only that one was refused.
            log.warning("request refused", extra={"reason": reason, "path": scope["path"][:200]})
            response = error_response(
                401,
                f"{reason}: send X-API-Key: KEY (or Authorization: Bearer KEY)",
                {"WWW-Authenticate": 'Bearer realm="vertex-dispatcher"'},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self._app(scope, receive, send)
