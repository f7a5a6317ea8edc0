"""Scenario 6, cost under deadline: the same N jobs all `standard`, all `flex`, all `auto`.

The stand-in plays Vertex's consumption tiers (`devtools/dispatcher_devtools/vertex_standin.py`):
Provisioned Throughput in two regions, shared on-demand capacity in every region, and a
Flex PayGo pool on `global` that is slower and throttled. The price table makes flex half
the standard price and PT free per token. Each variant runs on a fresh stack (so the
dispatcher's learned limits and the `auto` rule's p95 start from nothing) and is read three
ways: the job records (on time, final, answered by which tier), the stand-in's counters
(tokens per traffic type, calls per lane and status) and the ingress's `/metrics`
(`dispatcher_cost_usd_total`, `dispatcher_upstream_calls_total` per lane).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from tests.benchmarks.harness import (
    MODEL,
    REGIONS,
    TERMINAL,
    BenchStack,
    CpuMeter,
    RawHttp,
    Submission,
    bench_stack,
    parse_time,
    run_async,
    submit_all,
    track_until_finished,
)

GLOBAL: Final = "global"
VARIANTS: Final = ("standard", "flex", "auto")
# The rate of each usageMetadata.trafficType in the price table (dispatcher/pricing.py).
RATE_OF_TRAFFIC: Final = {
    "ON_DEMAND": "standard",
    "PROVISIONED_THROUGHPUT": "provisioned",
    "ON_DEMAND_FLEX": "flex",
    "ON_DEMAND_PRIORITY": "priority",
}
JsonBody = dict[str, Any]
_LABEL: Final = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, kw_only=True)
class TierScenario:
    """The regions, the flex pool, the deadline and the prices of one cost-under-deadline run.

    The defaults are the full run; `SMOKE` is the small version of the integration tier.
    """

    jobs: int = 4000
    deadline_s: float = 180.0
    regions: tuple[str, ...] = REGIONS
    provisioned_regions: tuple[str, ...] = ("us-central1", "europe-west4")
    standard_capacity: int = 32  # on-demand calls in flight per region (and on global)
    latency_s: float = 0.5  # standard and PT calls
    provisioned_capacity: int = 8  # PT calls in flight per PT region
    flex_capacity: int = 40
    flex_latency_s: float = 2.0
    flex_rate_per_s: float = 30.0
    provisioned_jobs: int = 500  # the small all-provisioned variant
    prompt_chars: int = 1000  # padding of each prompt (about 250 prompt tokens)
    response_bytes: int = 1200  # each answer's size (about 200 candidates tokens)
    standard_price: tuple[float, float] = (0.30, 2.50)  # USD per million prompt, candidates
    flex_price: tuple[float, float] = (0.15, 1.25)
    provisioned_price: tuple[float, float] = (0.0, 0.0)

    @property
    def on_demand_pools(self) -> tuple[str, ...]:
        """Every pool standard calls may use: the regions and `global`'s own."""
        return (*self.regions, GLOBAL)

    @property
    def provisioned_per_s(self) -> float:
        """PT calls per second at most, both PT regions full."""
        return len(self.provisioned_regions) * self.provisioned_capacity / self.latency_s

    @property
    def standard_per_s(self) -> float:
        """Standard calls per second at most: PT plus every on-demand pool full."""
        on_demand = len(self.on_demand_pools) * self.standard_capacity / self.latency_s
        return on_demand + self.provisioned_per_s

    @property
    def flex_per_s(self) -> float:
        """Flex calls per second at most: its capacity over its latency, under its rate."""
        return min(self.flex_capacity / self.flex_latency_s, self.flex_rate_per_s)

    @property
    def flex_jobs_by_deadline(self) -> int:
        """Jobs flex can answer before the deadline at most (from the first submission)."""
        return int(self.flex_per_s * self.deadline_s)

    def construction(self) -> str:
        """The physical limits that decide the comparison, in one paragraph."""
        return (
            f"N = {self.jobs:,} jobs, each with a deadline of {self.deadline_s:g} s from its "
            f"submission. Flex: {self.flex_capacity} calls in flight x {self.flex_latency_s:g} s "
            f"(rate {self.flex_rate_per_s:g}/s) = at most {self.flex_per_s:g} jobs/s, so at "
            f"most ~{self.flex_jobs_by_deadline:,} of the {self.jobs:,} jobs "
            f"({self.flex_jobs_by_deadline / self.jobs:.0%}, plus what the submission time "
            "adds) can be answered by flex before their deadline. Standard: "
            f"{len(self.on_demand_pools)} on-demand pools x {self.standard_capacity} x "
            f"{self.latency_s:g} s plus PT {len(self.provisioned_regions)} x "
            f"{self.provisioned_capacity} = {self.standard_per_s:g} jobs/s, N in "
            f"{self.jobs / self.standard_per_s:.0f} s, well inside the deadline."
        )

    def describe(self) -> str:
        """One line for the report's heading."""
        return (
            f"PT {len(self.provisioned_regions)} x {self.provisioned_capacity}, on demand "
            f"{len(self.on_demand_pools)} x {self.standard_capacity} x "
            f"{self.latency_s * 1000:.0f} ms, flex {self.flex_capacity} x "
            f"{self.flex_latency_s * 1000:.0f} ms at <= {self.flex_rate_per_s:g}/s, "
            f"deadline {self.deadline_s:g} s"
        )

    def standin_config(self) -> dict[str, Any]:
        """The stand-in's tiers: PT in two regions, on demand everywhere, flex on `global`.

        A region listed in the stand-in's config does not inherit `default`, so each
        listed one repeats the on-demand pool's fields.
        """
        on_demand = {
            "capacity": self.standard_capacity,
            "latency_s": self.latency_s,
            "response_bytes": self.response_bytes,
        }
        regions: dict[str, Any] = {
            region: {**on_demand, "provisioned_capacity": self.provisioned_capacity}
            for region in self.provisioned_regions
        }
        regions[GLOBAL] = {
            **on_demand,
            "flex": {
                "capacity": self.flex_capacity,
                "latency_s": self.flex_latency_s,
                "rate_per_s": self.flex_rate_per_s,
                "response_bytes": self.response_bytes,
            },
        }
        return {"default": on_demand, "regions": regions}

    def model_config(self) -> str:
        """MODEL_CONFIG: the regions, `global`, and the PT regions."""
        return json.dumps(
            [
                {
                    "model_id": MODEL,
                    "supported_regions": list(self.on_demand_pools),
                    "provisioned_regions": list(self.provisioned_regions),
                }
            ]
        )

    def prices(self) -> dict[str, dict[str, dict[str, float]]]:
        """The price table (PRICE_TABLE_FILE's content): USD per million tokens."""
        rates = {
            "standard": self.standard_price,
            "flex": self.flex_price,
            "provisioned": self.provisioned_price,
        }
        return {
            MODEL: {
                rate: {"prompt": prompt, "candidates": candidates}
                for rate, (prompt, candidates) in rates.items()
            }
        }

    def body_for(self, tier: str) -> Callable[[str], JsonBody]:
        """The POST body of a job of `tier`: a short unique text, padding, tier, deadline."""
        padding = "p" * self.prompt_chars

        def body(text: str) -> JsonBody:
            # The first text is the job's own (the stand-in echoes it); the padding is a
            # second part, so it counts as prompt tokens without swelling the answer.
            parts = [{"text": text}, {"text": padding}]
            return {
                "contents": [{"role": "user", "parts": parts}],
                "tier": tier,
                "deadline": self.deadline_s,
            }

        return body


SMOKE: Final = TierScenario(
    jobs=200,
    deadline_s=5.0,
    standard_capacity=8,
    latency_s=0.1,
    provisioned_capacity=4,
    flex_capacity=8,
    flex_latency_s=0.5,
    provisioned_jobs=40,
    prompt_chars=200,
    response_bytes=600,
)


@dataclass
class TierRun:
    """The figures of one variant (every job of one tier)."""

    variant: str
    jobs: int
    deadline_s: float
    on_time: int  # succeeded, answered before the job's deadline
    statuses: dict[str, int]
    failed_by_code: dict[str, int]
    lost: int  # accepted (or not) and never in a final state
    wall_s: float  # first submission to the last job's updated_at
    answered_by_tier: dict[str, int]
    tokens: dict[str, dict[str, int]]  # the stand-in's, per trafficType
    cost_usd: float  # the stand-in's tokens x the price table
    metrics_cost_usd: float  # the ingress's dispatcher_cost_usd_total
    metrics_cost_by_rate: dict[str, float]
    calls_by_lane: dict[str, dict[str, int]]  # the stand-in's call log: lane -> status -> n
    standin_by_status: dict[str, dict[str, int]]  # the stand-in's stats: region -> status -> n
    upstream_by_lane: dict[str, dict[str, int]]  # dispatcher_upstream_calls_total
    provisioned_jobs_on_demand_tokens: int  # tokens not billed as PT of jobs asking for PT
    cpu_s: dict[str, float] = field(default_factory=dict)
    # (t answered, lane, status) of every upstream call, t from the run's start (the chart).
    calls_log: list[tuple[float, str, int]] = field(default_factory=list, repr=False)

    @property
    def on_time_share(self) -> float:
        """Share of the N jobs answered before their deadline."""
        return self.on_time / self.jobs if self.jobs else 0.0

    @property
    def token_total(self) -> int:
        """Every token the stand-in billed."""
        return sum(kinds["total"] for kinds in self.tokens.values())

    def token_share(self, rate: str) -> float:
        """Share of the billed tokens at `rate` (standard, provisioned, flex, priority)."""
        total = self.token_total
        billed = sum(
            kinds["total"] for traffic, kinds in self.tokens.items() if _rate(traffic) == rate
        )
        return billed / total if total else 0.0

    @property
    def cost_per_1000(self) -> float:
        """USD per 1,000 submitted jobs (failed jobs cost nothing, and count)."""
        return self.cost_usd / self.jobs * 1000 if self.jobs else 0.0

    def share_429(self, lanes: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, str]:
        """429 share of the calls per kind of lane: `flex`, `provisioned`, `standard`."""
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for lane, statuses in (lanes if lanes is not None else self.calls_by_lane).items():
            kind = lane.partition("~")[2] or "standard"
            by_kind[kind].update(statuses)
        return {
            kind: f"{counts['429'] / total:.1%} of {total:,}"
            for kind, counts in sorted(by_kind.items())
            if (total := sum(counts.values()))
        }

    def summary(self) -> dict[str, Any]:
        """Every figure but the call log, for the log."""
        doc = asdict(self)
        doc.pop("calls_log")
        return doc


def _rate(traffic_type: str) -> str:
    return RATE_OF_TRAFFIC.get(traffic_type, traffic_type)


def token_cost(tokens: Mapping[str, Mapping[str, int]], prices: Mapping[str, Any]) -> float:
    """USD of the stand-in's tokens per trafficType at the table's rates (one model)."""
    total = 0.0
    for traffic_type, kinds in tokens.items():
        rate = prices.get(_rate(traffic_type), {})
        total += kinds["prompt"] * rate.get("prompt", 0.0) / 1e6
        total += kinds["candidates"] * rate.get("candidates", 0.0) / 1e6
    return total


def metric_samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of metric `name` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            yield dict(_LABEL.findall(labels)), float(value)


@contextmanager
def tier_stack(
    scenario: TierScenario, *, log_dir: Path, mode: str = "memory"
) -> Iterator[BenchStack]:
    """A fresh mode-1 stack (stand-in, ingress) with the scenario's tiers and price table."""
    table = log_dir / f"prices-{uuid.uuid4().hex[:8]}.json"
    table.write_text(json.dumps(scenario.prices()), encoding="utf-8")
    with bench_stack(
        mode,
        log_dir=log_dir,
        standin_config=scenario.standin_config(),
        regions=scenario.on_demand_pools,
        emulators=None,  # named, so mypy knows the settings below cannot fill it
        MODEL_CONFIG=scenario.model_config(),
        PRICE_TABLE_FILE=str(table),
    ) as stack:
        yield stack


def run_tier_variant(
    stack: BenchStack,
    scenario: TierScenario,
    *,
    variant: str,
    jobs: int | None = None,
    timeout_s: float | None = None,
) -> TierRun:
    """Submit `jobs` jobs of tier `variant`, each with the scenario's deadline; read the figures.

    Args:
        stack: A fresh stack from `tier_stack` (its stand-in is reset first).
        scenario: The regions, prices and deadline.
        variant: The tier every job asks for.
        jobs: N (the scenario's by default).
        timeout_s: Give up waiting after this long (default: the deadline plus 120 s);
            jobs not final by then count as lost.
    """
    count = scenario.jobs if jobs is None else jobs
    limit_s = scenario.deadline_s + 120 if timeout_s is None else timeout_s
    run_id = uuid.uuid4().hex[:8]
    texts = [f"{variant}-{run_id}-{i}" for i in range(count)]
    with httpx.Client(trust_env=False, timeout=30) as http:
        http.post(f"{stack.standin.url}/_standin/reset").raise_for_status()
        meter = CpuMeter(stack.process_groups())
        started = time.time()
        submissions = run_async(_drive(stack, texts, scenario.body_for(variant), limit_s))
        cpu = meter.used()
        stats = http.get(f"{stack.standin.url}/_standin/stats").json()
        calls = http.get(f"{stack.standin.url}/_standin/calls").json()
        metrics = http.get(f"{stack.ingress.url}/metrics").text
    views = [s.view for s in submissions if s.view is not None]
    final = [v for v in views if v["status"] in TERMINAL]
    on_time = [
        v
        for v in final
        if v["status"] == "succeeded" and parse_time(v["updated_at"]) <= parse_time(v["deadline"])
    ]
    failed_by_code = Counter(
        str(v.get("error", {}).get("status", "?")) for v in final if v["status"] == "failed"
    )
    answered_by = Counter(
        str(v.get("answered_by", {}).get("tier")) for v in final if v["status"] == "succeeded"
    )
    end = max((parse_time(v["updated_at"]) for v in final), default=time.time())
    calls_by_lane: dict[str, Counter[str]] = defaultdict(Counter)
    for call in calls:
        calls_by_lane[_call_lane(call)][str(call["status"])] += 1
    upstream: dict[str, Counter[str]] = defaultdict(Counter)
    for labels, value in metric_samples(metrics, "dispatcher_upstream_calls_total"):
        upstream[labels["region"]][labels["outcome"]] += int(value)
    cost_by_rate: dict[str, float] = defaultdict(float)
    for labels, value in metric_samples(metrics, "dispatcher_cost_usd_total"):
        cost_by_rate[labels["rate"]] += value
    tokens = {t: dict(kinds) for t, kinds in stats["tokens"].items()}
    provisioned_leak = 0
    if variant == "provisioned":
        # A provisioned job must never be billed on demand: every token of this variant
        # (all its jobs ask for PT) must be PROVISIONED_THROUGHPUT, in the stand-in's
        # counters and in each job's own usage.
        provisioned_leak = sum(
            kinds["total"] for t, kinds in tokens.items() if t != "PROVISIONED_THROUGHPUT"
        )
        provisioned_leak += sum(
            int(v["usage"].get("totalTokenCount", 0))
            for v in final
            if v.get("usage") and v["usage"].get("trafficType") != "PROVISIONED_THROUGHPUT"
        )
    return TierRun(
        variant=variant,
        jobs=count,
        deadline_s=scenario.deadline_s,
        on_time=len(on_time),
        statuses=dict(Counter(str(v["status"]) for v in views)),
        failed_by_code=dict(failed_by_code),
        lost=count - len(final),
        wall_s=round(end - started, 1),
        answered_by_tier=dict(answered_by),
        tokens=tokens,
        cost_usd=round(token_cost(tokens, scenario.prices()[MODEL]), 6),
        metrics_cost_usd=round(sum(cost_by_rate.values()), 6),
        metrics_cost_by_rate={k: round(v, 6) for k, v in sorted(cost_by_rate.items())},
        calls_by_lane={lane: dict(c) for lane, c in sorted(calls_by_lane.items())},
        standin_by_status={r: dict(s["by_status"]) for r, s in stats["regions"].items()},
        upstream_by_lane={lane: dict(c) for lane, c in sorted(upstream.items())},
        provisioned_jobs_on_demand_tokens=provisioned_leak,
        cpu_s=cpu,
        calls_log=[
            (round(c["t"] + c["latency_s"], 3), _call_lane(c), int(c["status"])) for c in calls
        ],
    )


def _call_lane(call: Mapping[str, Any]) -> str:
    """The dispatcher's lane name of a stand-in call, from its request-type headers."""
    if call.get("shared_request_type"):
        return f"{call['region']}~{call['shared_request_type']}"
    if call.get("request_type") == "dedicated":
        return f"{call['region']}~provisioned"
    return str(call["region"])


async def _drive(
    stack: BenchStack, texts: list[str], body_for: Callable[[str], JsonBody], timeout_s: float
) -> list[Submission]:
    deadline = time.monotonic() + timeout_s
    accepted: list[Submission] = []
    submitting = True
    ingress = RawHttp(stack.ingress.url, 32)
    standin = RawHttp(stack.standin.url, 2)
    try:
        tracker = asyncio.create_task(
            track_until_finished(
                ingress,
                standin,
                accepted,
                jobs=len(texts),
                submitting=lambda: submitting,
                deadline=deadline,
            )
        )
        try:
            submissions, _answers = await submit_all(
                ingress, texts, concurrency=16, deadline=deadline, body_for=body_for
            )
            accepted.extend(submissions)
        finally:
            submitting = False
        await tracker
    finally:
        await ingress.close()
        await standin.close()
    return accepted
