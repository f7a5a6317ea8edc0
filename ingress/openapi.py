"""GET /openapi.json: the ingress's API description, kept in the repository beside this file.

`tests/integration/test_security.py` holds it to the real behaviour: every route of
the app is described, and every status the fuzz run sees is one it lists.
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI document, read once."""
    return resources.files("ingress").joinpath("openapi.json").read_bytes()


async def openapi(request: Request) -> Response:
    """GET /openapi.json."""
    return Response(
        openapi_document(),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )
