"""Consumption tiers: headers, regions, lanes, the `auto` rule, parsing (dispatcher/tiers.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dispatcher.errors import ConfigError, InvalidRequest
from dispatcher.jobs import Job
from dispatcher.listing import add_usage
from dispatcher.regions import Breaker, Outcome, PoolConfig, RegionPool
from dispatcher.settings import ModelConfig, Settings, Tier
from dispatcher.tiers import (
    FLEX_THROTTLES_BEFORE_STANDARD,
    HEADERS,
    REQUEST_TYPE,
    SHARED_REQUEST_TYPE,
    STANDARD_RESERVE_PRIOR_S,
    LatencyBook,
    auto_tier,
    lane,
    lane_parts,
    parse_tier,
    regions_for,
    standard_reserve_s,
    tier_from_headers,
)
from dispatcher.validation import parse_deadline

MODEL = ModelConfig(
    model_id="m",
    regions=("us-central1", "europe-west4", "asia-east1", "global"),
    provisioned_regions=("europe-west4", "asia-east1"),
)
REGIONAL_ONLY = ModelConfig(model_id="r", regions=("us-central1",))
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("tier", "headers"),
    [
        (Tier.PROVISIONED, {REQUEST_TYPE: "dedicated"}),
        (Tier.STANDARD, {}),
        (Tier.FLEX, {REQUEST_TYPE: "shared", SHARED_REQUEST_TYPE: "flex"}),
        (Tier.PRIORITY, {REQUEST_TYPE: "shared", SHARED_REQUEST_TYPE: "priority"}),
    ],
)
def test_each_tier_sends_exactly_its_headers(tier: Tier, headers: dict[str, str]) -> None:
    """A tier's calls carry exactly the request-type headers Vertex defines for it."""
    assert dict(HEADERS[tier]) == headers


@pytest.mark.parametrize(
    ("tier", "regions"),
    [
        (Tier.PROVISIONED, ("europe-west4", "asia-east1")),
        (Tier.STANDARD, ("europe-west4", "asia-east1", "us-central1", "global")),
        (Tier.FLEX, ("global",)),
        (Tier.PRIORITY, ("global",)),
    ],
)
def test_regions_for_a_tier(tier: Tier, regions: tuple[str, ...]) -> None:
    """Provisioned runs only in PT regions; standard tries them first; flex, priority on global."""
    assert regions_for(MODEL, tier) == regions


@pytest.mark.parametrize("tier", list(Tier.__members__.values()))
def test_lane_round_trips(tier: Tier) -> None:
    """A lane key gives back its region and tier; a standard lane is the plain region."""
    key = lane("global", tier)
    assert lane_parts(key) == ("global", Tier.STANDARD if tier is Tier.STANDARD else tier)
    assert (key == "global") is (tier is Tier.STANDARD)


@pytest.mark.parametrize(
    ("time_left_s", "throttles", "expected"),
    [
        (None, 0, Tier.FLEX),
        (100.0, 0, Tier.FLEX),
        (31.5, 0, Tier.FLEX),
        (31.0, 0, Tier.STANDARD),
        (10.5, 0, Tier.STANDARD),
        (100.0, FLEX_THROTTLES_BEFORE_STANDARD - 1, Tier.FLEX),
        (100.0, FLEX_THROTTLES_BEFORE_STANDARD, Tier.STANDARD),
        (None, FLEX_THROTTLES_BEFORE_STANDARD, Tier.STANDARD),
    ],
)
def test_auto_moves_to_standard_when_time_runs_short_or_flex_keeps_throttling(
    time_left_s: float | None, throttles: int, expected: Tier
) -> None:
    """auto: flex while more time is left than the standard reserve (3 p95s + 1 s: 31 s
    for a 10 s p95), and until flex has throttled the job FLEX_THROTTLES_BEFORE_STANDARD
    times; standard after."""
    assert standard_reserve_s(10.0) == 31.0
    assert standard_reserve_s(None) == STANDARD_RESERVE_PRIOR_S
    chosen = auto_tier(time_left_s=time_left_s, standard_p95_s=10.0, flex_throttles=throttles)
    assert chosen is expected


def test_latency_book_p95_of_recent_calls_and_none_before_any() -> None:
    """p95 is None before any call, then the 95th percentile of the recent durations."""
    book = LatencyBook(keep=100)
    assert book.p95("m", Tier.STANDARD) is None
    for seconds in range(1, 101):
        book.record("m", Tier.STANDARD, float(seconds))
    assert book.p95("m", Tier.STANDARD) == 95.0
    assert book.p95("m", Tier.FLEX) is None
    book.record("m", Tier.STANDARD, 1000.0)  # the oldest (1 s) drops out
    assert book.p95("m", Tier.STANDARD) == 96.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Tier.STANDARD),
        ("flex", Tier.FLEX),
        ("auto", Tier.AUTO),
        ("provisioned", Tier.PROVISIONED),
    ],
)
def test_parse_tier(value: object, expected: Tier) -> None:
    """A tier name is taken as given; none means the model's default tier."""
    assert parse_tier(value, MODEL) is expected


@pytest.mark.parametrize(
    ("value", "model", "says"),
    [
        ("cheap", MODEL, "is not one of"),
        (3, MODEL, "is not one of"),
        ("flex", REGIONAL_ONLY, "needs the 'global' region"),
        ("priority", REGIONAL_ONLY, "needs the 'global' region"),
        ("auto", REGIONAL_ONLY, "needs the 'global' region"),
        ("provisioned", REGIONAL_ONLY, "no provisioned_regions"),
    ],
)
def test_parse_tier_refuses_with_the_reason(value: object, model: ModelConfig, says: str) -> None:
    """An unknown tier, or one the model cannot run, is refused saying why, naming the field."""
    with pytest.raises(InvalidRequest, match=says) as refused:
        parse_tier(value, model)
    assert refused.value.field == "tier"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-vertex-ai-llm-request-type": "dedicated"}, Tier.PROVISIONED),
        ({"x-vertex-ai-llm-request-type": "shared"}, Tier.STANDARD),
        ({"x-vertex-ai-llm-shared-request-type": "flex"}, Tier.FLEX),
        (
            {
                "x-vertex-ai-llm-request-type": "shared",
                "x-vertex-ai-llm-shared-request-type": "priority",
            },
            Tier.PRIORITY,
        ),
    ],
)
def test_tier_from_vertex_headers(headers: dict[str, str], expected: Tier | None) -> None:
    """Vertex's own two headers name the tier on the Vertex-compatible route."""
    assert tier_from_headers(headers) is expected


@pytest.mark.parametrize(
    "headers",
    [
        {"x-vertex-ai-llm-request-type": "cheap"},
        {"x-vertex-ai-llm-shared-request-type": "batch"},
        {
            "x-vertex-ai-llm-request-type": "dedicated",
            "x-vertex-ai-llm-shared-request-type": "flex",
        },
    ],
)
def test_tier_from_vertex_headers_refuses_what_vertex_does_not_define(
    headers: dict[str, str],
) -> None:
    """A request-type value Vertex does not define, or flex with dedicated, is refused."""
    with pytest.raises(InvalidRequest):
        tier_from_headers(headers)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (30, NOW + timedelta(seconds=30)),
        (0.5, NOW + timedelta(seconds=0.5)),
        ("2026-12-01T13:00:00Z", NOW + timedelta(hours=1)),
        ("2026-12-01T14:00:00+01:00", NOW + timedelta(hours=1)),
    ],
)
def test_parse_deadline(raw: object, expected: datetime | None) -> None:
    """A deadline is an RFC 3339 time or seconds from now, kept in UTC."""
    assert parse_deadline(raw, NOW) == expected


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("tomorrow", "RFC 3339"),
        ("2026-12-01T13:00:00", "RFC 3339"),
        (True, "RFC 3339"),
        (float("nan"), "RFC 3339"),
        ([1], "RFC 3339"),
        (0, "already passed"),
        ("2026-12-01T11:00:00Z", "already passed"),
        (8 * 24 * 3600, "more than 7 days"),
    ],
)
def test_parse_deadline_refuses_with_the_reason(raw: object, says: str) -> None:
    """A deadline that is not a time, has passed, or is over 7 days ahead is refused."""
    with pytest.raises(InvalidRequest, match=says):
        parse_deadline(raw, NOW)


def _env(model_config: str) -> dict[str, str]:
    return {"GOOGLE_CLOUD_PROJECT": "p", "MODEL_ID": "m", "MODEL_CONFIG": model_config}


def test_model_config_reads_the_tier_options() -> None:
    """MODEL_CONFIG's optional keys: provisioned_regions, default_tier, fallbacks."""
    settings = Settings.from_env(
        _env(
            '[{"model_id": "m", "supported_regions": ["us-central1", "global"],'
            ' "provisioned_regions": ["us-central1"], "default_tier": "auto",'
            ' "fallbacks": ["n"]}, {"model_id": "n", "supported_regions": ["us-central1"]}]'
        )
    )
    model = settings.models["m"]
    assert (model.provisioned_regions, model.default_tier, model.fallbacks) == (
        ("us-central1",),
        Tier.AUTO,
        ("n",),
    )
    assert settings.models["n"].default_tier is Tier.STANDARD


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ('"provisioned_regions": ["asia-east1"]', "provisioned_regions must be a list of its"),
        ('"default_tier": "cheap"', "default_tier 'cheap' is not one of"),
        ('"default_tier": "flex"', "needs the 'global' region"),
        ('"default_tier": "provisioned"', "needs provisioned_regions"),
        ('"fallbacks": ["nowhere"]', "are not other configured models"),
        ('"fallbacks": ["m"]', "are not other configured models"),
    ],
)
def test_model_config_refuses_bad_tier_options(extra: str, says: str) -> None:
    """A bad tier option in MODEL_CONFIG is a ConfigError naming the variable and the problem."""
    with pytest.raises(ConfigError, match=says) as refused:
        Settings.from_env(
            _env(f'[{{"model_id": "m", "supported_regions": ["us-central1"], {extra}}}]')
        )
    assert refused.value.variable == "MODEL_CONFIG"


async def test_lanes_are_learned_apart() -> None:
    """Flex throttling (429s) and a failing PT lane change only their own lanes: the
    region's standard lane keeps its breaker closed and its limit."""
    pool = RegionPool(PoolConfig(concurrency_initial=8))
    flex, provisioned = lane("global", Tier.FLEX), lane("us-central1", Tier.PROVISIONED)
    for _ in range(4):
        pool.release(await pool.acquire([flex]), Outcome.OVERLOADED)
    pool.release(await pool.acquire([provisioned]), Outcome.FAILED)
    assert pool.state(flex).limit < 8
    assert pool.state(provisioned).breaker is Breaker.OPEN
    for region in ("global", "us-central1"):
        assert pool.state(region).breaker is Breaker.CLOSED
        assert pool.state(region).limit == 8


def test_usage_totals_skip_missing_fields() -> None:
    """Usage without some token fields adds what it has; a job without usage adds nothing."""
    totals: dict[tuple[str, str], dict[str, int]] = {}
    base = datetime(2026, 12, 1, tzinfo=UTC)
    common: dict[str, Any] = {
        "model": "m",
        "region": "us-central1",
        "request": {},
        "created_at": base,
        "updated_at": base,
        "expire_at": base,
        "models_tried": ("m",),
        "tiers_tried": ("flex",),
    }
    add_usage(totals, Job(job_id="a" * 22, usage={"totalTokenCount": 7}, **common))
    add_usage(
        totals,
        Job(job_id="b" * 22, usage={"promptTokenCount": 2, "trafficType": "X"}, **common),
    )
    add_usage(totals, Job(job_id="c" * 22, usage=None, **common))
    assert totals == {
        ("m", "flex"): {
            "jobs": 2,
            "prompt": 2,
            "candidates": 0,
            "cached": 0,
            "thoughts": 0,
            "total": 7,
        }
    }
