"""The Vertex client against the project's stand-in, over loopback HTTP.

The stand-in is served in the test's own loop on a loopback port, and the client
uses the production aiohttp session: no emulator is needed, a socket is.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dispatcher.regions import Breaker, PoolConfig, RegionPool, RegionStrategy
from dispatcher.vertex import RetryPolicy, VertexClient, http_session
from tests.support.standin import ServedStandin, serving_standin

REGIONS = ("us-central1", "europe-west4", "asia-northeast1")
REQUEST = {"contents": [{"role": "user", "parts": [{"text": "ping"}]}]}

pytestmark = pytest.mark.integration


@pytest.fixture
async def vertex_factory() -> AsyncIterator[Callable[..., Any]]:
    """Builds (client, served stand-in) pairs over a fresh stand-in with a config doc."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            config: dict[str, Any] | None = None, cooldown_s: float = 0.01, **policy: Any
        ) -> tuple[VertexClient, ServedStandin]:
            standin = await stack.enter_async_context(serving_standin(config))
            fields = {
                "max_retries": 3,
                "backoff_initial_s": 0.001,
                "backoff_max_s": 0.01,
                "attempt_timeout_s": 5.0,
                "budget_s": 30.0,
                **policy,
            }
            client = VertexClient(
                standin.session,
                project="p",
                pool=RegionPool(
                    PoolConfig(cooldown_initial_s=cooldown_s, cooldown_max_s=max(cooldown_s, 1))
                ),
                policy=RetryPolicy(**fields),
                endpoint=standin.url,
            )
            return client, standin

        yield make


async def test_urls_follow_the_regional_and_global_hosts() -> None:
    """Regional models go to {region}-aiplatform, 'global' to aiplatform.googleapis.com."""
    async with http_session() as session:
        client = VertexClient(
            session,
            project="p",
            pool=RegionPool(PoolConfig()),
            policy=RetryPolicy(
                max_retries=0, backoff_initial_s=1, backoff_max_s=1, attempt_timeout_s=1, budget_s=1
            ),
        )
    path = "/v1/projects/p/locations/{0}/publishers/google/models/m:generateContent"
    assert client.url_for("m", "europe-west4") == (
        "https://europe-west4-aiplatform.googleapis.com" + path.format("europe-west4")
    )
    assert client.url_for("m", "global") == "https://aiplatform.googleapis.com" + path.format(
        "global"
    )


async def test_success_returns_vertex_response(vertex_factory: Callable[..., Any]) -> None:
    """A 200 returns Vertex's JSON as sent, after one call in the preferred region."""
    client, standin = await vertex_factory()
    report = await client.generate(
        model="m", request=REQUEST, regions=REGIONS, preferred="europe-west4"
    )
    assert report.error is None
    assert report.regions == ("europe-west4",)
    assert report.response is not None
    text = report.response["candidates"][0]["content"]["parts"][0]["text"]
    assert text == "stand-in reply from europe-west4: ping"
    assert (await standin.stats())["authorization_headers"] == 0


async def test_transient_errors_move_to_the_next_region(vertex_factory: Callable[..., Any]) -> None:
    """A 503 then a 429 are retried, each time in the next region, and every call is counted."""
    client, _ = await vertex_factory(
        {"regions": {"us-central1": {"status": 503}, "europe-west4": {"status": 429}}}
    )
    report = await client.generate(
        model="m", request=REQUEST, regions=REGIONS, preferred="us-central1"
    )
    assert report.response is not None
    assert report.regions == ("us-central1", "europe-west4", "asia-northeast1")


async def test_transient_errors_in_one_region_then_success(
    vertex_factory: Callable[..., Any],
) -> None:
    """With one region, 503 and 429 are retried there with backoff until it answers."""
    client, standin = await vertex_factory({"default": {"script": [503, 429]}})
    report = await client.generate(
        model="m", request=REQUEST, regions=["us-central1"], preferred="us-central1"
    )
    assert report.response is not None
    assert report.calls == 3
    assert (await standin.stats())["regions"]["us-central1"]["by_status"] == {
        "503": 1,
        "429": 1,
        "200": 1,
    }


async def test_permanent_error_fails_after_one_call(vertex_factory: Callable[..., Any]) -> None:
    """A 400 is not retried; Vertex's own code, status and message are kept."""
    client, standin = await vertex_factory({"default": {"status": 400}})
    report = await client.generate(
        model="m", request=REQUEST, regions=REGIONS, preferred="us-central1"
    )
    assert report.response is None and report.error is not None
    assert report.calls == 1
    assert report.error.error.code == 400
    assert report.error.error.status == "INVALID_ARGUMENT"
    assert report.error.error.message
    assert (await standin.stats())["total_calls"] == 1


async def test_retries_stop_at_the_configured_count(vertex_factory: Callable[..., Any]) -> None:
    """With every region down, VERTEX_MAX_RETRIES retries are made, then the last error returns."""
    client, _ = await vertex_factory({"default": {"status": 503}}, max_retries=2)
    report = await client.generate(
        model="m", request=REQUEST, regions=REGIONS, preferred="us-central1"
    )
    assert report.calls == 3
    assert report.error is not None and report.error.error.code == 503


async def test_failing_region_breaker_opens(vertex_factory: Callable[..., Any]) -> None:
    """After a 503 the region cools down; the next job starts in the next region."""
    client, _ = await vertex_factory({"regions": {"us-central1": {"status": 503}}}, cooldown_s=30)
    await client.generate(model="m", request=REQUEST, regions=REGIONS, preferred="us-central1")
    second = await client.generate(
        model="m", request=REQUEST, regions=REGIONS, preferred="us-central1"
    )
    assert second.regions == ("europe-west4",)
    assert client._pool.state("us-central1").breaker is Breaker.OPEN


async def test_timeout_is_transient(vertex_factory: Callable[..., Any]) -> None:
    """An attempt past VERTEX_TIMEOUT_S counts as a transient 504 and moves on."""
    client, _ = await vertex_factory(
        {"regions": {"us-central1": {"latency_s": 5}}}, attempt_timeout_s=0.2
    )
    report = await client.generate(
        model="m", request=REQUEST, regions=REGIONS, preferred="us-central1"
    )
    assert report.response is not None
    assert report.regions == ("us-central1", "europe-west4")


async def test_pinned_region_is_never_left(vertex_factory: Callable[..., Any]) -> None:
    """A job allowed only one region retries there and nowhere else."""
    client, _ = await vertex_factory({"regions": {"europe-west4": {"script": [503]}}})
    report = await client.generate(
        model="m", request=REQUEST, regions=["europe-west4"], preferred="europe-west4"
    )
    assert report.regions == ("europe-west4", "europe-west4")


async def test_unreachable_endpoint_is_transient() -> None:
    """A refused connection is a 503 UNAVAILABLE for every attempt, each counted as a call."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused
        async with http_session() as session:
            client = VertexClient(
                session,
                project="p",
                pool=RegionPool(PoolConfig(cooldown_initial_s=0.001, cooldown_max_s=0.001)),
                policy=RetryPolicy(
                    max_retries=1,
                    backoff_initial_s=0.001,
                    backoff_max_s=0.001,
                    attempt_timeout_s=5,
                    budget_s=5,
                ),
                endpoint=f"http://127.0.0.1:{port}",
            )
            report = await client.generate(
                model="m", request=REQUEST, regions=REGIONS, preferred="us-central1"
            )
    assert report.error is not None and report.error.transient
    assert report.error.error.code == 503 and report.error.error.status == "UNAVAILABLE"
    assert report.error.error.message.startswith("connection failed")
    assert report.regions == ("us-central1", "europe-west4")


@pytest.mark.parametrize(
    ("strategy", "expected_regions"),
    [
        (RegionStrategy.NAIVE, ["us-central1"] * 4),
        (RegionStrategy.ADAPTIVE, ["us-central1", "europe-west4"]),
    ],
)
async def test_retries_stay_in_the_assigned_region_only_when_naive(
    strategy: RegionStrategy, expected_regions: list[str]
) -> None:
    """Naive retries a 429 in the job's own region (with backoff); adaptive moves on."""
    async with serving_standin({"regions": {"us-central1": {"status": 429}}}) as standin:
        client = VertexClient(
            standin.session,
            project="p",
            pool=RegionPool(PoolConfig(strategy=strategy)),
            policy=RetryPolicy(
                max_retries=3,
                backoff_initial_s=0.001,
                backoff_max_s=0.002,
                attempt_timeout_s=5,
                budget_s=30,
            ),
            endpoint=standin.url,
        )
        report = await client.generate(
            model="m",
            request={"contents": [{"parts": [{"text": "q"}]}]},
            regions=REGIONS,
            preferred="us-central1",
        )
        calls = [call["region"] for call in (await standin.control.get("/_standin/calls")).json()]
    assert calls == expected_regions
    assert list(report.regions) == expected_regions
