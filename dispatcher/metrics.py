"""Prometheus metrics of one process, served at `GET /metrics` by both services.

Counters and histograms are updated where things happen (the Vertex client, the
job manager, the ingress); region health, limits and queue depths are read from
the live objects at scrape time, so they can never drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dispatcher.regions import Breaker, RegionPool

JOBS = Counter(
    "dispatcher_jobs",
    "Jobs that reached a state in this process (accepted at the ingress; terminal states "
    "where this process finished them).",
    ["state"],
    registry=None,  # registered per runtime by `build_registry`
)
UPSTREAM_CALLS = Counter(
    "dispatcher_upstream_calls",
    "Vertex generateContent calls by region and outcome (HTTP status, or timeout/connection).",
    ["region", "outcome"],
    registry=None,  # registered per runtime by `build_registry`
)
UPSTREAM_LATENCY = Histogram(
    "dispatcher_upstream_latency_seconds",
    "Latency of Vertex calls by region.",
    ["region"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300),
    registry=None,  # registered per runtime by `build_registry`
)
STORE_OPERATIONS = Counter(
    "dispatcher_store_operations",
    "Firestore operations by kind (an update counts once, however many conflicts it retried).",
    ["operation"],
    registry=None,  # registered per runtime by `build_registry`
)
TOKENS = Counter(
    "dispatcher_tokens",
    "Tokens of answered jobs by model, region, tier, Vertex's trafficType, caller and kind "
    "(prompt, candidates, cached, thoughts, total), from each response's usageMetadata.",
    ["model", "region", "tier", "traffic_type", "caller", "kind"],
    registry=None,  # registered per runtime by `build_registry`
)
COST = Counter(
    "dispatcher_cost_usd",
    "What answered jobs cost by PRICE_TABLE_FILE, by model, billing rate (from trafficType) "
    "and caller.",
    ["model", "rate", "caller"],
    registry=None,  # registered per runtime by `build_registry`
)
KEY_JOBS = Counter(
    "dispatcher_key_jobs",
    "Jobs by API key (caller; empty with keys off) and state: accepted at this ingress, "
    "or brought to a final state by this process.",
    ["caller", "state"],
    registry=None,  # registered per runtime by `build_registry`
)
KEY_REFUSALS = Counter(
    "dispatcher_key_refusals",
    "Submissions refused because the API key was over a limit, by caller and limit "
    "(rpm, tpm, max_unfinished, tokens_per_day, tokens_per_month).",
    ["caller", "limit"],
    registry=None,  # registered per runtime by `build_registry`
)
KEY_QUEUE_WAIT = Histogram(
    "dispatcher_key_queue_wait_seconds",
    "Time each Vertex call waited for a region slot, by caller and class (interactive, "
    "batch): the wait the fair share orders.",
    ["caller", "priority"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
    registry=None,  # registered per runtime by `build_registry`
)
WEBHOOKS = Counter(
    "dispatcher_webhooks",
    "Webhook deliveries by outcome: delivered, retry (the receiver failed or was "
    "unreachable; Pub/Sub redelivers), undeliverable (refused address, no secret, or "
    "WEBHOOK_DELIVERY_MAX_S passed; given up).",
    ["outcome"],
    registry=None,  # registered per runtime by `build_registry`
)
_BREAKER_VALUE = {Breaker.CLOSED: 0, Breaker.HALF_OPEN: 1, Breaker.OPEN: 2}


def build_registry(
    pool: RegionPool, *, queued: Callable[[], int], running: Callable[[], int]
) -> CollectorRegistry:
    """The registry one service serves: the process's counters and its live state."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (
        JOBS,
        UPSTREAM_CALLS,
        UPSTREAM_LATENCY,
        STORE_OPERATIONS,
        TOKENS,
        COST,
        KEY_JOBS,
        KEY_REFUSALS,
        KEY_QUEUE_WAIT,
        WEBHOOKS,
    ):
        registry.register(collector)
    registry.register(LiveStateCollector(pool, queued=queued, running=running))
    return registry


class LiveStateCollector(Collector):
    """Region health and work in flight, read from the live objects at each scrape."""

    def __init__(
        self, pool: RegionPool, *, queued: Callable[[], int], running: Callable[[], int]
    ) -> None:
        self._pool = pool
        self._queued = queued
        self._running = running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges."""
        health = GaugeMetricFamily(
            "dispatcher_region_breaker_state",
            "Circuit breaker per region: 0 closed, 1 half-open, 2 open (cooling down).",
            labels=["region"],
        )
        limit = GaugeMetricFamily(
            "dispatcher_region_concurrency_limit",
            "Adaptive limit of Vertex calls in flight per region.",
            labels=["region"],
        )
        in_flight = GaugeMetricFamily(
            "dispatcher_region_in_flight", "Vertex calls in flight per region.", labels=["region"]
        )
        for name, state in sorted(self._pool.snapshot().items()):
            health.add_metric([name], _BREAKER_VALUE[state.breaker])
            limit.add_metric([name], state.limit)
            in_flight.add_metric([name], state.in_flight)
        yield health
        yield limit
        yield in_flight
        yield GaugeMetricFamily(
            "dispatcher_jobs_queued", "Jobs waiting in this process's queue.", value=self._queued()
        )
        yield GaugeMetricFamily(
            "dispatcher_jobs_running", "Jobs this process is executing.", value=self._running()
        )
