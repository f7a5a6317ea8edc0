"""A push endpoint that acknowledges after SINK_DELAY_S, to time the Pub/Sub emulator alone.

`python -m tests.benchmarks.push_sink` serves `POST /` (204 after the delay) and
`GET /stats` (pushes, most in flight at once, first and last push, monotonic seconds).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DELAY_S = float(os.environ.get("SINK_DELAY_S", "0"))
STATE: dict[str, Any] = {
    "pushes": 0,
    "in_flight": 0,
    "max_in_flight": 0,
    "first": None,
    "last": None,
}


async def push(request: Request) -> Response:
    """Acknowledge one push after the delay."""
    await request.body()
    STATE["in_flight"] += 1
    STATE["max_in_flight"] = max(STATE["max_in_flight"], STATE["in_flight"])
    STATE["first"] = STATE["first"] or time.monotonic()
    try:
        if DELAY_S:
            await asyncio.sleep(DELAY_S)
    finally:
        STATE["in_flight"] -= 1
    STATE["pushes"] += 1
    STATE["last"] = time.monotonic()
    return Response(status_code=204)


async def stats(request: Request) -> Response:
    """The counters."""
    return JSONResponse(STATE)


app = Starlette(routes=[Route("/", push, methods=["POST"]), Route("/stats", stats)])

if __name__ == "__main__":
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ["PORT"]),
        log_level="warning",
        access_log=False,
    )
