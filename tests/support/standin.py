"""The Vertex stand-in served inside the test's own event loop, on a free loopback port.

Unit tests of the Vertex client and the executor call it over real HTTP with the
production session (`dispatcher.vertex.http_session`), so the code under test is the
code that runs in the services; only the process boundary is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import uvicorn
from dispatcher_devtools.vertex_standin import StandinConfig, create_app

from dispatcher.vertex import http_session


@dataclass(frozen=True)
class ServedStandin:
    """A running stand-in: its base URL, a client for its control API, a Vertex session."""

    url: str
    control: httpx.AsyncClient
    session: aiohttp.ClientSession

    async def stats(self) -> dict[str, Any]:
        """The stand-in's call counts (`GET /_standin/stats`)."""
        return dict((await self.control.get("/_standin/stats")).json())


@contextlib.asynccontextmanager
async def serving_standin(config: dict[str, Any] | None = None) -> AsyncIterator[ServedStandin]:
    """Serve a stand-in configured by `config` (the stand-in's JSON doc) until exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(StandinConfig.from_doc(config or {})),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # start-up failed: raise its error
            await asyncio.sleep(0.005)
        async with (
            httpx.AsyncClient(base_url=url, trust_env=False) as control,
            http_session() as session,
        ):
            yield ServedStandin(url=url, control=control, session=session)
    finally:
        server.should_exit = True
        await task
        sock.close()
