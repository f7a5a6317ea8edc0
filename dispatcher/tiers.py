"""Consumption tiers: what each sends to Vertex, where it may run, and the `auto` rule.

Vertex sells one model several ways, chosen per request by two headers
(https://cloud.google.com/vertex-ai/generative-ai/docs/provisioned-throughput/use-provisioned-throughput,
https://cloud.google.com/vertex-ai/generative-ai/docs/flex-paygo):

- `X-Vertex-AI-LLM-Request-Type: dedicated`: Provisioned Throughput (PT) only, 429 past it;
  `shared`: pay-as-you-go only; absent: PT first, the overage billed on demand.
- `X-Vertex-AI-LLM-Shared-Request-Type: flex` (Flex PayGo, about half price, slower, more
  throttled) or `priority` (Priority PayGo, premium), on the `global` endpoint only.

Each tier is learned apart: a call's *lane* is its region and tier (`global~flex`), and
the region pool keeps limits and breakers per lane, so a PT ceiling is not taken for a
region's shared capacity and flex throttling never opens `global` for standard calls.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from dispatcher.errors import InvalidRequest
from dispatcher.settings import ModelConfig, Tier

REQUEST_TYPE = "X-Vertex-AI-LLM-Request-Type"
SHARED_REQUEST_TYPE = "X-Vertex-AI-LLM-Shared-Request-Type"
GLOBAL = "global"
_LANE_MARK = "~"  # region names never hold it

# Exactly the headers each tier sends; nothing else reaches Vertex from a client's headers.
HEADERS: Mapping[Tier, Mapping[str, str]] = MappingProxyType(
    {
        Tier.PROVISIONED: MappingProxyType({REQUEST_TYPE: "dedicated"}),
        Tier.STANDARD: MappingProxyType({}),
        Tier.FLEX: MappingProxyType({REQUEST_TYPE: "shared", SHARED_REQUEST_TYPE: "flex"}),
        Tier.PRIORITY: MappingProxyType({REQUEST_TYPE: "shared", SHARED_REQUEST_TYPE: "priority"}),
    }
)

# `auto`: before standard calls of a model have been timed, keep this long for standard
# (the reserve itself, not a p95 to multiply: 3 x 10 s + 1 s sent a third of the
# benchmark's jobs to standard before a single standard call was seen).
STANDARD_RESERVE_PRIOR_S = 10.0
# `auto` moves a job to standard while this much is left: a few standard calls' p95 and
# a margin, not one p95, because a job leaving flex meets the others leaving it at the
# same moment (a backlog that flex could not serve in time) and waits for standard
# slots too. With one p95 the benchmark's auto run finished 90.4 % on time, not 99 %.
STANDARD_RESERVE_P95S = 3.0
STANDARD_RESERVE_MARGIN_S = 1.0
# `auto`: flex throttled this many times in a row for a job moves it to standard.
FLEX_THROTTLES_BEFORE_STANDARD = 3


def check_tier(model: ModelConfig, tier: Tier) -> None:
    """Refuse a tier the model cannot be run on.

    Raises:
        InvalidRequest: saying why (no `global` region for flex, priority and auto;
            no Provisioned Throughput for provisioned).
    """
    if tier in (Tier.FLEX, Tier.PRIORITY, Tier.AUTO) and GLOBAL not in model.regions:
        raise InvalidRequest(
            f"tier: {tier} needs the 'global' region, which is not configured for "
            f"{model.model_id} (Flex and Priority PayGo are served on the global endpoint only)",
            field="tier",
        )
    if tier is Tier.PROVISIONED and not model.provisioned_regions:
        raise InvalidRequest(
            f"tier: provisioned needs Provisioned Throughput, and {model.model_id} has no "
            "provisioned_regions in MODEL_CONFIG",
            field="tier",
        )


def regions_for(model: ModelConfig, tier: Tier) -> tuple[str, ...]:
    """The regions a call of `tier` may go to, in the order to try them.

    A standard call tries the PT regions first (without a header Vertex serves it from
    PT while PT has room, then on demand), then the others.
    """
    if tier is Tier.PROVISIONED:
        return model.provisioned_regions
    if tier in (Tier.FLEX, Tier.PRIORITY):
        return (GLOBAL,)
    provisioned = set(model.provisioned_regions)
    return (
        *model.provisioned_regions,
        *(region for region in model.regions if region not in provisioned),
    )


def lane(region: str, tier: Tier) -> str:
    """The pool key of calls of `tier` to `region` (a standard lane is the plain region)."""
    return region if tier is Tier.STANDARD else f"{region}{_LANE_MARK}{tier.value}"


def lane_parts(key: str) -> tuple[str, Tier]:
    """The region and tier of a lane key."""
    region, _, tier = key.partition(_LANE_MARK)
    return region, Tier(tier) if tier else Tier.STANDARD


def standard_reserve_s(standard_p95_s: float | None) -> float:
    """The time an `auto` job keeps for standard before its deadline (the prior while
    no standard call of the model has been timed)."""
    if standard_p95_s is None:
        return STANDARD_RESERVE_PRIOR_S
    return STANDARD_RESERVE_P95S * standard_p95_s + STANDARD_RESERVE_MARGIN_S


def auto_tier(
    *, time_left_s: float | None, standard_p95_s: float | None, flex_throttles: int
) -> Tier:
    """The tier an `auto` job's next call uses.

    Flex while the time left exceeds the standard reserve (`standard_reserve_s` of the
    p95 of the model's standard calls), and flex has not kept throttling the job;
    standard from then on.
    """
    if flex_throttles >= FLEX_THROTTLES_BEFORE_STANDARD:
        return Tier.STANDARD
    if time_left_s is not None and time_left_s <= standard_reserve_s(standard_p95_s):
        return Tier.STANDARD
    return Tier.FLEX


class LatencyBook:
    """Recent durations of successful calls per model and tier, for the `auto` rule."""

    def __init__(self, *, keep: int = 200) -> None:
        self._keep = keep
        self._seen: dict[tuple[str, Tier], collections.deque[float]] = {}

    def record(self, model: str, tier: Tier, seconds: float) -> None:
        """Count one successful call's duration."""
        seen = self._seen.get((model, tier))
        if seen is None:
            seen = self._seen[model, tier] = collections.deque(maxlen=self._keep)
        seen.append(seconds)

    def p95(self, model: str, tier: Tier) -> float | None:
        """The 95th percentile of the recent durations; None before any."""
        seen = self._seen.get((model, tier))
        if not seen:
            return None
        ordered = sorted(seen)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def parse_tier(value: object, model: ModelConfig) -> Tier:
    """A request's `"tier"` (the model's default when absent), checked against the model.

    Raises:
        InvalidRequest: not a tier name, or one the model cannot run.
    """
    if value is None:
        tier = model.default_tier
    elif isinstance(value, str) and value in _TIER_NAMES:
        tier = Tier(value)
    else:
        raise InvalidRequest(
            f"tier: {str(value)[:40]!r} is not one of {', '.join(_TIER_NAMES)}", field="tier"
        )
    check_tier(model, tier)
    return tier


def tier_from_headers(headers: Mapping[str, str]) -> Tier | None:
    """The tier Vertex's own two headers ask for (the Vertex-compatible route); None if neither.

    Raises:
        InvalidRequest: a value Vertex does not define.
    """
    request_type = headers.get(REQUEST_TYPE.lower())
    shared_type = headers.get(SHARED_REQUEST_TYPE.lower())
    if request_type is None and shared_type is None:
        return None
    if request_type not in (None, "dedicated", "shared"):
        raise InvalidRequest(
            f"{REQUEST_TYPE}: {request_type[:40]!r} is not dedicated or shared", field=REQUEST_TYPE
        )
    if shared_type not in (None, "flex", "priority"):
        raise InvalidRequest(
            f"{SHARED_REQUEST_TYPE}: {shared_type[:40]!r} is not flex or priority",
            field=SHARED_REQUEST_TYPE,
        )
    if request_type == "dedicated":
        if shared_type is not None:
            raise InvalidRequest(
                f"{SHARED_REQUEST_TYPE} applies to shared requests, not dedicated ones",
                field=SHARED_REQUEST_TYPE,
            )
        return Tier.PROVISIONED
    if shared_type is not None:
        return Tier(shared_type)
    return Tier.STANDARD


_TIER_NAMES: Sequence[str] = tuple(t.value for t in Tier)
