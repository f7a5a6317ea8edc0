"""Tests for the Vertex AI stand-in server (devtools/dispatcher_devtools/vertex_standin.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from dispatcher_devtools.vertex_standin import (
    GOOGLE_STATUS,
    REQUEST_TYPE_HEADER,
    SHARED_REQUEST_TYPE_HEADER,
    RegionBehaviour,
    StandinConfig,
    create_app,
    main,
)
from starlette.applications import Starlette
from starlette.types import Message

from dispatcher.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemini-2.0-flash-001"
CALL_LOG_KEYS = {
    "t",
    "region",
    "status",
    "text",
    "latency_s",
    "request_type",
    "shared_request_type",
    "traffic_type",
    "method",
    "chunk_times",
}

ClientFactory = Callable[..., httpx.AsyncClient]


def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://standin")


@pytest.fixture
async def standin() -> AsyncIterator[ClientFactory]:
    """Factory: an in-process client for a stand-in built from an optional config."""
    clients: list[httpx.AsyncClient] = []

    def make(config: StandinConfig | None = None) -> httpx.AsyncClient:
        client = _client(create_app(config))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def _path(
    region: str = "us-central1", *, version: str = "v1", action: str = "generateContent"
) -> str:
    return (
        f"/{version}/projects/test-project/locations/{region}"
        f"/publishers/google/models/{MODEL}:{action}"
    )


def _request(text: str) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


async def _generate(
    client: httpx.AsyncClient,
    region: str = "us-central1",
    text: str = "hello",
    **headers: str,
) -> httpx.Response:
    return await client.post(_path(region), json=_request(text), headers=headers)


async def _stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/_standin/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def _wait_for_in_flight(client: httpx.AsyncClient, region: str, count: int) -> None:
    for _ in range(500):
        if (await _stats(client))["regions"].get(region, {}).get("in_flight") == count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{region} never had {count} call(s) in flight")


def _assert_google_error(response: httpx.Response, code: int, status: str) -> str:
    assert response.status_code == code
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "status"}
    assert body["error"]["code"] == code
    assert body["error"]["status"] == status
    message: str = body["error"]["message"]
    assert message
    return message


# -- generateContent ---------------------------------------------------------------------


async def test_success_has_vertex_shape(standin: ClientFactory) -> None:
    """A successful call returns exactly Vertex's generateContent body with a deterministic text."""
    response = await _generate(standin(), "europe-west4", "Say hi")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"candidates", "usageMetadata", "modelVersion", "createTime", "responseId"}
    assert body["candidates"] == [
        {
            "content": {
                "role": "model",
                "parts": [{"text": "stand-in reply from europe-west4: Say hi"}],
            },
            "finishReason": "STOP",
            "avgLogprobs": -0.1,
        }
    ]
    usage = body["usageMetadata"]
    assert set(usage) == {
        "promptTokenCount",
        "candidatesTokenCount",
        "totalTokenCount",
        "trafficType",
    }
    assert usage["trafficType"] == "ON_DEMAND"
    assert usage["promptTokenCount"] > 0
    assert usage["candidatesTokenCount"] > 0
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert body["modelVersion"] == MODEL
    assert body["createTime"].endswith("Z")
    datetime.fromisoformat(body["createTime"])
    assert isinstance(body["responseId"], str)
    assert body["responseId"]


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
async def test_both_api_versions_are_served(standin: ClientFactory, version: str) -> None:
    """Both the v1 path and the v1beta1 path (used by google-genai) answer generateContent."""
    response = await standin().post(_path(version=version), json=_request("hi"))

    assert response.status_code == 200
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"].endswith(": hi")


@pytest.mark.parametrize(
    "path",
    [
        _path(version="v2"),
        _path(action="generateImages"),
        _path(action="rawPredict"),
        "/v1/projects/p/locations/us-central1/publishers/google/models/no-action",
        "/nowhere",
    ],
)
async def test_unknown_paths_answer_google_404(standin: ClientFactory, path: str) -> None:
    """Unknown versions, actions and paths answer 404 in Google's error shape."""
    response = await standin().post(path, json=_request("hi"))

    _assert_google_error(response, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "Invalid JSON payload"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "empty contents"),
        (b'{"contents": []}', "empty contents"),
        (b'{"contents": "hello"}', "empty contents"),
        (b'{"contents": [1]}', "contents[0]"),
    ],
)
async def test_bad_body_is_invalid_argument(
    standin: ClientFactory, body: bytes, problem: str
) -> None:
    """A body that is not JSON or lacks a non-empty contents list gets 400 naming the problem."""
    response = await standin().post(
        _path(), content=body, headers={"content-type": "application/json"}
    )

    assert problem in _assert_google_error(response, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        (
            [
                {"role": "model", "parts": [{"text": "m"}]},
                {"role": "user", "parts": [{"text": "u"}]},
            ],
            "u",
        ),
        ([{"parts": [{"text": "no role"}]}], "no role"),
        (
            [
                {
                    "role": "user",
                    "parts": [{"inlineData": {"mimeType": "a/b", "data": ""}}, {"text": "t"}],
                }
            ],
            "t",
        ),
        ([{"role": "user", "parts": [{"inlineData": {"mimeType": "a/b", "data": ""}}]}], ""),
    ],
)
async def test_reply_quotes_first_user_text(
    standin: ClientFactory, contents: list[dict[str, Any]], expected: str
) -> None:
    """The reply quotes the first text part of the first user content (role absent = user)."""
    response = await standin().post(_path("asia-northeast1"), json={"contents": contents})

    text = response.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert text == f"stand-in reply from asia-northeast1: {expected}"


@pytest.mark.parametrize(("code", "status"), sorted(GOOGLE_STATUS.items()))
async def test_fixed_status_answers_google_error(
    standin: ClientFactory, code: int, status: str
) -> None:
    """A region with a fixed error status answers every call with it, in Google's shape."""
    client = standin(StandinConfig(regions={"us-east5": RegionBehaviour(status=code)}))

    for _ in range(2):
        _assert_google_error(await _generate(client, "us-east5"), code, status)
    assert (await _generate(client, "us-central1")).status_code == 200


async def test_script_plays_in_order_then_falls_back(standin: ClientFactory) -> None:
    """A region's script answers the next calls in order, then the region's status applies."""
    client = standin(StandinConfig(regions={"us-central1": RegionBehaviour(script=(503, 429))}))

    statuses = [(await _generate(client)).status_code for _ in range(4)]

    assert statuses == [503, 429, 200, 200]


async def test_default_script_plays_once_per_region(standin: ClientFactory) -> None:
    """An unlisted region plays its own copy of the default behaviour's script."""
    client = standin(StandinConfig(default=RegionBehaviour(script=(500,))))

    assert (await _generate(client, "a-region1")).status_code == 500
    assert (await _generate(client, "b-region1")).status_code == 500
    assert (await _generate(client, "a-region1")).status_code == 200


async def test_capacity_rejects_calls_beyond_it_at_once(standin: ClientFactory) -> None:
    """With `capacity` calls in flight, one more gets 429 at once; the others succeed."""
    capacity = 3
    client = standin(StandinConfig(default=RegionBehaviour(latency_s=0.5, capacity=capacity)))

    async def timed_call(i: int) -> tuple[int, float, str]:
        started = time.monotonic()
        response = await _generate(client, text=f"job-{i}")
        return response.status_code, time.monotonic() - started, response.text

    results = await asyncio.gather(*(timed_call(i) for i in range(capacity + 1)))

    assert sorted(status for status, _, _ in results) == [200] * capacity + [429]
    [(_, rejected_after, rejected_body)] = [r for r in results if r[0] == 429]
    assert rejected_after < 0.4
    assert f"stand-in capacity {capacity}" in rejected_body
    assert json.loads(rejected_body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    region = (await _stats(client))["regions"]["us-central1"]
    assert region["max_in_flight"] == capacity
    assert region["in_flight"] == 0


async def test_rate_limit_rejects_beyond_burst(standin: ClientFactory) -> None:
    """With rate_per_s=1 (burst 1), a second immediate call gets 429."""
    client = standin(StandinConfig(default=RegionBehaviour(rate_per_s=1.0)))

    first, second = await _generate(client), await _generate(client)

    assert first.status_code == 200
    assert "stand-in rate" in _assert_google_error(second, 429, "RESOURCE_EXHAUSTED")


async def test_cancelled_slow_call_frees_its_slot(standin: ClientFactory) -> None:
    """Cancelling a call during its latency frees its capacity slot at once."""
    client = standin(StandinConfig(default=RegionBehaviour(latency_s=30, capacity=1)))
    slow = asyncio.create_task(_generate(client))
    await _wait_for_in_flight(client, "us-central1", 1)

    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    await client.patch("/_standin/regions/us-central1", json={"latency_s": 0})

    assert (await _generate(client)).status_code == 200


async def test_client_disconnect_ends_slow_call() -> None:
    """A client that disconnects during the latency ends the call (recorded as 499)."""
    app = create_app(StandinConfig(default=RegionBehaviour(latency_s=30, capacity=1)))
    path = _path()
    incoming: list[Message] = [
        {"type": "http.request", "body": json.dumps(_request("gone")).encode(), "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        if len(incoming) == 1:
            await asyncio.sleep(0.05)  # the client goes away mid-call
        return incoming.pop(0)

    async def send(message: Message) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "server": ("standin", 80),
        "client": ("127.0.0.1", 50000),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)

    async with _client(app) as client:
        region = (await _stats(client))["regions"]["us-central1"]
    assert region["by_status"] == {"499": 1}
    assert region["in_flight"] == 0


async def test_response_bytes_pads_body(standin: ClientFactory) -> None:
    """response_bytes pads the reply with "x" so the JSON body is at least that large."""
    target = 3 * 1024 * 1024
    client = standin(StandinConfig(regions={"us-central1": RegionBehaviour(response_bytes=target)}))

    response = await _generate(client, text="big")

    assert response.status_code == 200
    assert target <= len(response.content) < target + 16
    body = response.json()
    text = body["candidates"][0]["content"]["parts"][0]["text"]
    prefix = "stand-in reply from us-central1: big"
    assert text.startswith(prefix)
    assert set(text[len(prefix) :]) == {"x"}
    usage = body["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]


# -- consumption tiers -------------------------------------------------------------------

HOLD_S = 0.3
"""The latency of calls a test keeps in flight while it sends another."""


def _tier_headers(request_type: str | None = None, shared: str | None = None) -> dict[str, str]:
    headers = {REQUEST_TYPE_HEADER: request_type, SHARED_REQUEST_TYPE_HEADER: shared}
    return {name: value for name, value in headers.items() if value is not None}


def _traffic_type(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    traffic_type: str = response.json()["usageMetadata"]["trafficType"]
    return traffic_type


async def _hold(
    client: httpx.AsyncClient, region: str, count: int, **headers: str
) -> list[asyncio.Task[httpx.Response]]:
    """Start `count` calls and return once they are all in flight."""
    if not count:
        return []
    held = [
        asyncio.create_task(_generate(client, region, f"held-{i}", **headers)) for i in range(count)
    ]
    await _wait_for_in_flight(client, region, count)
    return held


@pytest.mark.parametrize(("provisioned", "held"), [(None, 0), (0, 0), (1, 1), (2, 2)])
async def test_dedicated_past_provisioned_throughput_is_429(
    standin: ClientFactory, provisioned: int | None, held: int
) -> None:
    """A dedicated call past the region's PT (or where it has none) gets 429 naming PT."""
    region = RegionBehaviour(provisioned_capacity=provisioned, provisioned_latency_s=HOLD_S)
    client = standin(StandinConfig(regions={"us-central1": region}))
    dedicated = _tier_headers("dedicated")
    holding = await _hold(client, "us-central1", held, **dedicated)

    refused = await _generate(client, **dedicated)

    assert "Provisioned Throughput" in _assert_google_error(refused, 429, "RESOURCE_EXHAUSTED")
    assert [_traffic_type(await call) for call in holding] == ["PROVISIONED_THROUGHPUT"] * held


async def test_no_request_type_spills_from_provisioned_to_shared(standin: ClientFactory) -> None:
    """Without a request-type header, a call PT has no room for is served pay-as-you-go."""
    region = RegionBehaviour(provisioned_capacity=1, provisioned_latency_s=HOLD_S)
    client = standin(StandinConfig(regions={"us-central1": region}))
    [on_provisioned] = await _hold(client, "us-central1", 1)

    spilled = await _generate(client)

    assert _traffic_type(spilled) == "ON_DEMAND"
    assert _traffic_type(await on_provisioned) == "PROVISIONED_THROUGHPUT"


async def test_shared_skips_provisioned_throughput(standin: ClientFactory) -> None:
    """A shared call gets the pay-as-you-go pool's answer even while PT has room."""
    region = RegionBehaviour(provisioned_capacity=5, status=503)
    client = standin(StandinConfig(regions={"us-central1": region}))

    shared = await _generate(client, **_tier_headers("shared"))

    _assert_google_error(shared, 503, "UNAVAILABLE")
    assert _traffic_type(await _generate(client)) == "PROVISIONED_THROUGHPUT"


@pytest.mark.parametrize("tier", ["flex", "priority"])
@pytest.mark.parametrize("request_type", [None, "shared", "dedicated"])
@pytest.mark.parametrize("location", ["us-central1", "europe-west4"])
async def test_flex_or_priority_on_a_regional_location_is_400(
    standin: ClientFactory, tier: str, request_type: str | None, location: str
) -> None:
    """Flex or priority sent to a regional location gets 400 saying only global serves it."""
    client = standin(StandinConfig(default=RegionBehaviour(provisioned_capacity=5)))

    response = await _generate(client, location, **_tier_headers(request_type, tier))

    message = _assert_google_error(response, 400, "INVALID_ARGUMENT")
    assert "only served on the global endpoint" in message
    assert location in message


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (REQUEST_TYPE_HEADER, "Dedicated"),
        (REQUEST_TYPE_HEADER, ""),
        (SHARED_REQUEST_TYPE_HEADER, "standard"),
        (SHARED_REQUEST_TYPE_HEADER, "FLEX"),
    ],
)
async def test_unknown_request_type_is_400(standin: ClientFactory, header: str, value: str) -> None:
    """A request-type header with a value Vertex does not define gets 400 naming the header."""
    response = await _generate(standin(), "global", **{header: value})

    assert header in _assert_google_error(response, 400, "INVALID_ARGUMENT")


@pytest.mark.parametrize("tier", ["flex", "priority"])
async def test_flex_and_priority_pools_refuse_past_their_capacity(
    standin: ClientFactory, tier: str
) -> None:
    """On global, a flex or priority call past its own pool's capacity gets 429 at once."""
    pools = {tier: {"capacity": 1, "latency_s": HOLD_S}}
    client = standin(StandinConfig.from_doc({"regions": {"global": pools}}))
    [held] = await _hold(client, "global", 1, **_tier_headers(shared=tier))

    refused = await _generate(client, "global", **_tier_headers(shared=tier))

    message = _assert_google_error(refused, 429, "RESOURCE_EXHAUSTED")
    assert f"stand-in {tier} capacity 1" in message
    assert _traffic_type(await _generate(client, "global")) == "ON_DEMAND"
    assert _traffic_type(await held) == f"ON_DEMAND_{tier.upper()}"


@pytest.mark.parametrize("tier", ["flex", "priority"])
async def test_flex_and_priority_without_a_pool_use_globals_own(
    standin: ClientFactory, tier: str
) -> None:
    """On global without a flex or priority pool, such a call gets global's own pool's answer."""
    client = standin(StandinConfig(regions={"global": RegionBehaviour(script=(503,))}))

    first, second = [await _generate(client, "global", **_tier_headers(shared=tier)) for _ in "12"]

    _assert_google_error(first, 503, "UNAVAILABLE")
    assert second.status_code == 200


_PT: dict[str, Any] = {"provisioned_capacity": 1}
_POOLS: dict[str, Any] = {"flex": {}, "priority": {}}


@pytest.mark.parametrize(
    ("location", "region", "headers", "expected"),
    [
        ("us-central1", _PT, {}, "PROVISIONED_THROUGHPUT"),
        ("us-central1", _PT, _tier_headers("dedicated"), "PROVISIONED_THROUGHPUT"),
        ("us-central1", _PT, _tier_headers("shared"), "ON_DEMAND"),
        ("us-central1", {}, {}, "ON_DEMAND"),
        ("us-central1", {"provisioned_capacity": 0}, {}, "ON_DEMAND"),
        ("global", _POOLS, _tier_headers(shared="flex"), "ON_DEMAND_FLEX"),
        ("global", {}, _tier_headers(shared="flex"), "ON_DEMAND_FLEX"),
        ("global", _POOLS, _tier_headers(shared="priority"), "ON_DEMAND_PRIORITY"),
        ("global", {}, _tier_headers(shared="priority"), "ON_DEMAND_PRIORITY"),
        ("global", {**_PT, **_POOLS}, _tier_headers(shared="flex"), "PROVISIONED_THROUGHPUT"),
        ("global", {**_PT, **_POOLS}, _tier_headers("shared", "flex"), "ON_DEMAND_FLEX"),
        ("global", {**_PT, **_POOLS}, _tier_headers("dedicated", "flex"), "PROVISIONED_THROUGHPUT"),
    ],
)
async def test_traffic_type_says_what_served_the_call(
    standin: ClientFactory,
    location: str,
    region: dict[str, Any],
    headers: dict[str, str],
    expected: str,
) -> None:
    """usageMetadata.trafficType names the tier that served the call, as Vertex's does."""
    client = standin(StandinConfig.from_doc({"regions": {location: region}}))

    assert _traffic_type(await _generate(client, location, **headers)) == expected


@pytest.mark.parametrize(
    ("request_doc", "prompt_tokens", "candidates_tokens"),
    [
        # The reply is "stand-in reply from us-central1: " (33 characters) + the first user text.
        (_request("abcd"), 1, 10),
        (_request("abcde"), 2, 10),
        (_request(""), 1, 9),
        (
            {
                "systemInstruction": {"parts": [{"text": "12345678"}]},
                "contents": [
                    {"role": "user", "parts": [{"text": "abc"}, {"text": "de"}]},
                    {"role": "model", "parts": [{"text": "fgh"}]},
                ],
            },
            4,
            9,
        ),
    ],
)
async def test_token_counts_follow_the_text(
    standin: ClientFactory, request_doc: dict[str, Any], prompt_tokens: int, candidates_tokens: int
) -> None:
    """Token counts are ceil(characters / 4), at least 1: all prompt text parts, then the reply."""
    response = await standin().post(_path(), json=request_doc)

    assert response.json()["usageMetadata"] == {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": candidates_tokens,
        "totalTokenCount": prompt_tokens + candidates_tokens,
        "trafficType": "ON_DEMAND",
    }


# -- stats and call log ------------------------------------------------------------------


async def test_stats_count_calls_by_region_status_text_and_auth(standin: ClientFactory) -> None:
    """Stats count calls per region and status, per first user text, and Authorization headers."""
    client = standin(StandinConfig(regions={"europe-west4": RegionBehaviour(status=503)}))
    await _generate(client, "us-central1", "a", authorization="Bearer test")
    await _generate(client, "us-central1", "b")
    await _generate(client, "europe-west4", "a", authorization="Bearer test")

    assert await _stats(client) == {
        "total_calls": 3,
        "regions": {
            "europe-west4": {
                "calls": 1,
                "by_status": {"503": 1},
                "by_traffic_type": {},
                "tokens": {},
                "max_in_flight": 1,
                "in_flight": 0,
            },
            "us-central1": {
                "calls": 2,
                "by_status": {"200": 2},
                "by_traffic_type": {"ON_DEMAND": 2},
                # Each: prompt "a"/"b" is 1 token; "stand-in reply from us-central1: a" 9.
                "tokens": {"ON_DEMAND": {"prompt": 2, "candidates": 18, "total": 20}},
                "max_in_flight": 1,
                "in_flight": 0,
            },
        },
        "tokens": {"ON_DEMAND": {"prompt": 2, "candidates": 18, "total": 20}},
        "calls_by_text": {"a": 2, "b": 1},
        "authorization_headers": 2,
    }


async def test_call_log_records_each_call_in_order(standin: ClientFactory) -> None:
    """The call log has one entry per call, oldest first, with time, region, status and text."""
    client = standin(StandinConfig(regions={"europe-west4": RegionBehaviour(status=429)}))
    await _generate(client, "us-central1", "first")
    await _generate(client, "europe-west4", "second " + "y" * 300)

    calls = (await client.get("/_standin/calls")).json()

    assert [(c["region"], c["status"], c["text"]) for c in calls] == [
        ("us-central1", 200, "first"),
        ("europe-west4", 429, ("second " + "y" * 300)[:200]),
    ]
    assert all(set(c) == CALL_LOG_KEYS for c in calls)
    assert 0 <= calls[0]["t"] <= calls[1]["t"]
    assert all(c["latency_s"] >= 0 for c in calls)


async def test_stats_count_tokens_by_traffic_type(standin: ClientFactory) -> None:
    """Stats total each traffic type's successes and tokens, per region and overall, as sent."""
    client = standin(
        StandinConfig.from_doc(
            {"regions": {"us-central1": {"provisioned_capacity": 5}, "global": {"flex": {}}}}
        )
    )
    calls = [
        ("us-central1", "on pt", {}),
        ("us-central1", "paid as you go", _tier_headers("shared")),
        ("global", "cheap", _tier_headers(shared="flex")),
        ("global", "cheaper still", _tier_headers(shared="flex")),
    ]
    expected: dict[str, dict[str, dict[str, int]]] = {}
    for location, text, headers in calls:
        usage = (await _generate(client, location, text, **headers)).json()["usageMetadata"]
        totals = expected.setdefault(location, {}).setdefault(
            usage["trafficType"], {"prompt": 0, "candidates": 0, "total": 0}
        )
        totals["prompt"] += usage["promptTokenCount"]
        totals["candidates"] += usage["candidatesTokenCount"]
        totals["total"] += usage["totalTokenCount"]

    stats = await _stats(client)

    assert {name: region["tokens"] for name, region in stats["regions"].items()} == expected
    assert {name: region["by_traffic_type"] for name, region in stats["regions"].items()} == {
        "global": {"ON_DEMAND_FLEX": 2},
        "us-central1": {"ON_DEMAND": 1, "PROVISIONED_THROUGHPUT": 1},
    }
    assert stats["tokens"] == {**expected["us-central1"], **expected["global"]}


@pytest.mark.parametrize(
    ("location", "request_type", "shared", "status", "traffic_type"),
    [
        ("us-central1", None, None, 200, "ON_DEMAND"),
        ("us-central1", "dedicated", None, 429, None),
        ("us-central1", "shared", None, 200, "ON_DEMAND"),
        ("us-central1", "shared", "flex", 400, None),
        ("us-central1", "sideways", None, 400, None),
        ("global", None, "flex", 200, "ON_DEMAND_FLEX"),
        ("global", "shared", "priority", 200, "ON_DEMAND_PRIORITY"),
    ],
)
async def test_call_log_records_request_type_headers(
    standin: ClientFactory,
    location: str,
    request_type: str | None,
    shared: str | None,
    status: int,
    traffic_type: str | None,
) -> None:
    """The call log has each call's two request-type headers as sent and its trafficType."""
    client = standin()
    await _generate(client, location, "logged", **_tier_headers(request_type, shared))

    [call] = (await client.get("/_standin/calls")).json()

    assert {k: call[k] for k in ("status", "request_type", "shared_request_type")} == {
        "status": status,
        "request_type": request_type,
        "shared_request_type": shared,
    }
    assert call["traffic_type"] == traffic_type


# -- control API -------------------------------------------------------------------------


async def test_patch_merges_into_one_region(standin: ClientFactory) -> None:
    """PATCH changes only the named fields of one region; other regions keep the default."""
    client = standin(StandinConfig(default=RegionBehaviour(response_bytes=10)))

    patched = await client.patch("/_standin/regions/europe-west4", json={"status": 503})
    assert patched.status_code == 200
    assert patched.json() == {**RegionBehaviour(response_bytes=10, status=503).to_doc()}
    await client.patch("/_standin/regions/europe-west4", json={"latency_s": 0.01})

    assert (await _generate(client, "europe-west4")).status_code == 503
    assert (await _generate(client, "us-central1")).status_code == 200
    config = (await client.get("/_standin/config")).json()
    assert config["regions"]["europe-west4"]["status"] == 503
    assert config["regions"]["europe-west4"]["latency_s"] == 0.01


async def test_put_replaces_config_and_restarts_scripts(standin: ClientFactory) -> None:
    """PUT replaces the whole config and restarts every region's script from its start."""
    client = standin(StandinConfig(regions={"us-central1": RegionBehaviour(script=(503, 503))}))
    assert (await _generate(client)).status_code == 503
    new_config = {"default": {"status": 200}, "regions": {"us-central1": {"script": [429]}}}

    put = await client.put("/_standin/config", json=new_config)

    assert put.status_code == 200
    assert put.json() == StandinConfig.from_doc(new_config).to_doc()
    assert [(await _generate(client)).status_code for _ in range(2)] == [429, 200]


async def test_reset_restores_startup_config_and_clears_stats(standin: ClientFactory) -> None:
    """POST /_standin/reset clears stats and the call log and restores the start-up config."""
    startup = StandinConfig(regions={"us-central1": RegionBehaviour(script=(500,))})
    client = standin(startup)
    await _generate(client)
    await client.put("/_standin/config", json={"default": {"status": 503}})
    assert (await _generate(client, "europe-west4")).status_code == 503

    reset = await client.post("/_standin/reset")

    assert reset.status_code == 200
    assert await _stats(client) == {
        "total_calls": 0,
        "regions": {},
        "tokens": {},
        "calls_by_text": {},
        "authorization_headers": 0,
    }
    assert (await client.get("/_standin/calls")).json() == []
    assert (await client.get("/_standin/config")).json() == startup.to_doc()
    assert [(await _generate(client)).status_code for _ in range(2)] == [500, 200]


@pytest.mark.parametrize(
    ("method", "path", "body", "named"),
    [
        ("PUT", "/_standin/config", b"{", "Invalid JSON"),
        ("PUT", "/_standin/config", b'{"defaults": {}}', "defaults"),
        ("PUT", "/_standin/config", b'{"regions": {"eu": {"status": 418}}}', "regions.eu.status"),
        ("PATCH", "/_standin/regions/eu", b'{"capacity": -1}', "regions.eu.capacity"),
        ("PATCH", "/_standin/regions/eu", b'{"latency": 1}', "latency"),
        ("PATCH", "/_standin/regions/eu", b'{"flex": {}}', "regions.eu.flex"),
        (
            "PUT",
            "/_standin/config",
            b'{"regions": {"global": {"flex": {"provisioned_capacity": 1}}}}',
            "regions.global.flex",
        ),
    ],
)
async def test_bad_control_body_is_rejected(
    standin: ClientFactory, method: str, path: str, body: bytes, named: str
) -> None:
    """A malformed control request gets 400 naming the field, and changes nothing."""
    client = standin()

    response = await client.request(method, path, content=body)

    assert named in _assert_google_error(response, 400, "INVALID_ARGUMENT")
    assert (await client.get("/_standin/config")).json() == StandinConfig().to_doc()


async def test_healthz_says_ok(standin: ClientFactory) -> None:
    """GET /healthz answers 200 ok."""
    response = await standin().get("/healthz")

    assert (response.status_code, response.text) == (200, "ok")


# -- configuration -----------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    """A config's JSON form parses back to an equal config."""
    config = StandinConfig(
        default=RegionBehaviour(latency_s=0.05, capacity=10),
        regions={
            "europe-west4": RegionBehaviour(status=503, script=(429,), rate_per_s=2.5),
            "global": RegionBehaviour(
                provisioned_capacity=4,
                provisioned_latency_s=0.01,
                flex=RegionBehaviour(latency_s=2.0, capacity=50),
                priority=RegionBehaviour(script=(503,)),
            ),
        },
    )

    assert StandinConfig.from_json(json.dumps(config.to_doc())) == config


def test_listed_region_does_not_inherit_default() -> None:
    """A region listed in the config has its own complete behaviour, not the default's."""
    config = StandinConfig.from_doc(
        {"default": {"status": 503}, "regions": {"us-central1": {"latency_s": 0.1}}}
    )

    assert config.behaviour_for("us-central1") == RegionBehaviour(latency_s=0.1)
    assert config.behaviour_for("elsewhere1").status == 503


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"status": 418}, "behaviour.status"),
        ({"script": (200, 302)}, "behaviour.script[1]"),
        ({"latency_s": -1.0}, "behaviour.latency_s"),
        ({"rate_per_s": 0.0}, "behaviour.rate_per_s"),
        ({"response_bytes": -5}, "behaviour.response_bytes"),
        ({"provisioned_capacity": -1}, "behaviour.provisioned_capacity"),
        ({"provisioned_latency_s": -0.5}, "behaviour.provisioned_latency_s"),
        ({"flex": {"capacity": 1}}, "behaviour.flex"),
        ({"priority": RegionBehaviour(provisioned_capacity=1)}, "behaviour.priority"),
    ],
)
def test_behaviour_rejects_bad_values(fields: dict[str, Any], named: str) -> None:
    """Building a behaviour with an out-of-range value raises ConfigError naming the field."""
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        RegionBehaviour(**fields)


@pytest.mark.parametrize(
    ("doc", "named"),
    [
        ({"default": {"flex": {}}}, "default.flex"),
        (
            {"regions": {"us-central1": {"priority": {"capacity": 1}}}},
            "regions.us-central1.priority",
        ),
    ],
)
def test_flex_and_priority_pools_only_on_global(doc: dict[str, Any], named: str) -> None:
    """A flex or priority pool anywhere but regions.global is refused, naming where it is."""
    with pytest.raises(ConfigError, match=f"{named}.*global endpoint only"):
        StandinConfig.from_doc(doc)


async def test_patch_merges_into_a_pool(standin: ClientFactory) -> None:
    """PATCH of a flex pool changes only its named fields."""
    client = standin(
        StandinConfig.from_doc({"regions": {"global": {"flex": {"latency_s": 2.0, "capacity": 1}}}})
    )

    patched = await client.patch("/_standin/regions/global", json={"flex": {"capacity": 2}})

    assert patched.status_code == 200
    assert patched.json()["flex"] == {
        "latency_s": 2.0,
        "capacity": 2,
        "rate_per_s": None,
        "status": 200,
        "script": [],
        "response_bytes": 0,
    }


def test_cli_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI exits with status 2 and names the source when the config is malformed."""
    with pytest.raises(SystemExit) as exited:
        main(["--port", "0", "--config", '{"regions": {"eu": {"status": "down"}}}'])

    assert exited.value.code == 2
    assert "--config: regions.eu.status" in capsys.readouterr().err
