"""Tiers, deadlines, fallbacks and token accounting, end to end against the stand-in.

The stand-in plays Vertex's consumption tiers (Provisioned Throughput per region, Flex
and Priority PayGo pools on `global`, `trafficType` in each answer, the request-type
headers in its call log), so each test checks what really reached "Vertex".
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from google import genai
from google.genai import types
from google.oauth2.credentials import Credentials

from tests.support.stack import MODEL, PROJECT, REGIONS, Stack, prompt, unique

pytestmark = pytest.mark.integration

MODES = ("memory", "pubsub")
PT_REGION = "europe-west4"
WITH_GLOBAL = json.dumps(
    [
        {
            "model_id": MODEL,
            "supported_regions": [*REGIONS, "global"],
            "provisioned_regions": [PT_REGION],
        }
    ]
)


def calls_for(stack: Stack, text: str) -> list[dict[str, Any]]:
    """The stand-in's log entries of the calls whose prompt is `text`."""
    log = stack.http.get(f"{stack.standin.url}/_standin/calls").json()
    return [call for call in log if call["text"] == text]


def submit(stack: Stack, text: str, **fields: Any) -> str:
    response = stack.submit({**prompt(text), **fields})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


@pytest.mark.parametrize("mode", MODES)
def test_provisioned_job_never_spills(stack_factory: Callable[..., Stack], mode: str) -> None:
    """A provisioned job is sent only as `dedicated` to the PT region and billed as PT,
    even while PT is full (it waits and retries, it never goes on demand)."""
    stack = stack_factory(
        mode,
        MODEL_CONFIG=WITH_GLOBAL,
        standin={"regions": {PT_REGION: {"provisioned_capacity": 1, "latency_s": 0.3}}},
        VERTEX_MAX_RETRIES="8",
    )
    texts = [unique("pt") for _ in range(4)]
    job_ids = [submit(stack, text, tier="provisioned") for text in texts]
    views = [stack.wait(job_id) for job_id in job_ids]
    assert [view["status"] for view in views] == ["succeeded"] * 4
    for text, view in zip(texts, views, strict=True):
        calls = calls_for(stack, text)
        assert {(c["region"], c["request_type"]) for c in calls} == {(PT_REGION, "dedicated")}
        assert view["usage"]["trafficType"] == "PROVISIONED_THROUGHPUT"
        assert set(view["tiers_tried"]) == {"provisioned"}
    assert "ON_DEMAND" not in stack.standin_stats()["tokens"]


def test_standard_job_uses_pt_first_and_spills_when_full(
    stack_factory: Callable[..., Stack],
) -> None:
    """Standard jobs start in the PT region without a request-type header: PT serves
    what it holds, the rest is served on demand there (Vertex's spill-over). Mode 1
    only: the Pub/Sub emulator pushes about one message at a time, so PT never fills."""
    stack = stack_factory(
        "memory",
        MODEL_CONFIG=WITH_GLOBAL,
        standin={"regions": {PT_REGION: {"provisioned_capacity": 2, "latency_s": 1.0}}},
    )
    texts = [unique("std") for _ in range(6)]
    job_ids = [submit(stack, text) for text in texts]
    views = [stack.wait(job_id) for job_id in job_ids]
    assert [view["status"] for view in views] == ["succeeded"] * 6
    for text in texts:
        first = calls_for(stack, text)[0]
        assert (first["region"], first["request_type"]) == (PT_REGION, None)
    traffic = [view["usage"]["trafficType"] for view in views]
    assert "PROVISIONED_THROUGHPUT" in traffic
    assert "ON_DEMAND" in traffic


@pytest.mark.parametrize("mode", MODES)
def test_auto_moves_from_throttled_flex_to_standard(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """An auto job goes to flex on global first; flex throttling it moves it to standard,
    which answers, and the record says so."""
    stack = stack_factory(
        mode,
        MODEL_CONFIG=WITH_GLOBAL,
        standin={"regions": {"global": {"flex": {"status": 429}}}},
    )
    text = unique("auto")
    view = stack.wait(submit(stack, text, tier="auto", deadline=120))
    assert view["status"] == "succeeded"
    calls = calls_for(stack, text)
    assert calls[0]["region"] == "global"
    assert calls[0]["shared_request_type"] == "flex"
    assert calls[-1]["shared_request_type"] is None
    assert view["tiers_tried"][0] == "flex"
    assert view["answered_by"]["tier"] == "standard"
    assert view["usage"]["trafficType"] in ("ON_DEMAND", "PROVISIONED_THROUGHPUT")


def test_auto_leaves_flex_in_time_for_the_deadline(stack_factory: Callable[..., Stack]) -> None:
    """A flex call that would outlast the deadline is cut short so that the standard
    reserve (10 s before any standard call is timed) still fits: the job is answered
    before its deadline."""
    stack = stack_factory(
        "memory",
        MODEL_CONFIG=WITH_GLOBAL,
        standin={"regions": {"global": {"flex": {"latency_s": 60}}}},
    )
    text = unique("auto-late")
    started = time.monotonic()
    view = stack.wait(submit(stack, text, tier="auto", deadline=13), timeout=30)
    assert view["status"] == "succeeded"
    assert time.monotonic() - started < 13
    assert view["tiers_tried"][0] == "flex"
    assert view["answered_by"]["tier"] == "standard"


@pytest.mark.parametrize("mode", MODES)
def test_passed_deadline_fails_deadline_exceeded(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """A job not answered by its deadline ends failed with DEADLINE_EXCEEDED and is not
    called again."""
    stack = stack_factory(mode, standin={"default": {"latency_s": 5}})
    text = unique("late")
    view = stack.wait(submit(stack, text, deadline=1), timeout=30)
    assert view["status"] == "failed"
    assert view["error"]["status"] == "DEADLINE_EXCEEDED"
    assert view["error"]["code"] == 504
    calls = len(calls_for(stack, text))
    time.sleep(1.0)
    assert len(calls_for(stack, text)) == calls


@pytest.mark.parametrize("mode", MODES)
def test_exhausted_model_falls_back_and_the_record_says_so(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """A model failing in every region moves to its fallback, which answers; with
    "fallback": false the job fails in its own model."""
    config = json.dumps(
        [
            {"model_id": MODEL, "supported_regions": ["us-central1"], "fallbacks": ["backup"]},
            {"model_id": "backup", "supported_regions": ["europe-west4"]},
        ]
    )
    stack = stack_factory(
        mode,
        MODEL_CONFIG=config,
        standin={"regions": {"us-central1": {"status": 503}}},
        VERTEX_MAX_RETRIES="1",
        MAX_DELIVERY_ATTEMPTS="1",
    )
    view = stack.wait(submit(stack, unique("fb")))
    assert view["status"] == "succeeded"
    assert view["answered_by"] == {"model": "backup", "region": "europe-west4", "tier": "standard"}
    assert view["models_tried"][0] == MODEL
    assert view["models_tried"][-1] == "backup"
    refused = stack.wait(submit(stack, unique("no-fb"), fallback=False))
    assert refused["status"] == "failed"
    assert set(refused["models_tried"]) == {MODEL}


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tier": "flex"}, "needs the 'global' region"),
        ({"tier": "cheap"}, "is not one of"),
        ({"deadline": "soon"}, "RFC 3339"),
        ({"fallback": "no"}, "true or false"),
    ],
)
def test_bad_tier_fields_are_400(
    stack_factory: Callable[..., Stack], fields: dict[str, Any], says: str
) -> None:
    """A tier the model cannot run, or a malformed tier, deadline or fallback, is a 400
    in the error shape that says why."""
    stack = stack_factory("memory")
    response = stack.submit({**prompt("x"), **fields})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert says in error["message"]


@pytest.mark.parametrize("mode", MODES)
def test_token_counters_match_the_stand_in(stack_factory: Callable[..., Stack], mode: str) -> None:
    """dispatcher_tokens_total, summed, equals the tokens the stand-in answered with."""
    stack = stack_factory(mode)
    job_ids = [submit(stack, unique("tok") * (i + 1)) for i in range(5)]
    for job_id in job_ids:
        assert stack.wait(job_id)["status"] == "succeeded"
    service = stack.worker if mode == "pubsub" else stack.ingress
    assert service is not None
    text = stack.http.get(f"{service.url}/metrics").text
    counted: dict[str, float] = {}
    for kind, value in re.findall(
        r'^dispatcher_tokens_total\{[^}]*kind="(\w+)"[^}]*\} ([0-9.e+]+)$', text, flags=re.M
    ):
        counted[kind] = counted.get(kind, 0.0) + float(value)
    answered = stack.standin_stats()["tokens"]["ON_DEMAND"]
    assert counted == {
        "prompt": answered["prompt"],
        "candidates": answered["candidates"],
        "total": answered["total"],
    }


def test_sdk_sends_the_flex_header_through_the_vertex_route(
    stack_factory: Callable[..., Stack],
) -> None:
    """The google-genai SDK's own flex header on the Vertex-compatible route makes the
    call a flex call on global."""
    stack = stack_factory("memory", MODEL_CONFIG=WITH_GLOBAL)
    client = genai.Client(
        vertexai=True,
        project=PROJECT,
        location="us-central1",
        credentials=Credentials(token="test"),
        http_options=types.HttpOptions(
            base_url=f"{stack.ingress.url}/",
            headers={
                "X-Vertex-AI-LLM-Request-Type": "shared",
                "X-Vertex-AI-LLM-Shared-Request-Type": "flex",
            },
        ),
    )
    text = unique("sdk-flex")
    response = client.models.generate_content(model=MODEL, contents=text)
    assert response.usage_metadata is not None
    traffic = response.usage_metadata.traffic_type
    assert str(getattr(traffic, "value", traffic)) == "ON_DEMAND_FLEX"
    [call] = calls_for(stack, text)
    assert (call["region"], call["request_type"], call["shared_request_type"]) == (
        "global",
        "shared",
        "flex",
    )
