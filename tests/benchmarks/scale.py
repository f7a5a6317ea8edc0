"""Benchmarks at realistic scale: slow calls, many uneven regions, a direct client baseline.

The scenarios of `test_5_scale.py` and their smoke version call these. The direct
client is the baseline a team without a dispatcher writes: calls sent straight at the
regions in round-robin, as many in flight as the regions hold in all, each 429 or 503
retried at the next region after an exponential backoff with jitter (1 s doubling to
30 s, as Vertex's documentation recommends), until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from tests.benchmarks.harness import (
    MODEL,
    BenchStack,
    Capacity,
    CpuMeter,
    GoodputResult,
    RawHttp,
    Strategy,
    percentile,
    prompt,
    rss_mib,
    run_async,
    service_env,
)
from tests.support.emulators import Emulator
from tests.support.processes import (
    ServiceProcess,
    base_child_env,
    spawn_logged,
    stop_process_group,
)
from tests.support.stack import PROJECT, start_standin

# The regions of the seed example's deploy command (async-request-dispatcher-rs README).
SEED_REGIONS: Final = (
    "us-central1",
    "us-east1",
    "us-east4",
    "us-east5",
    "us-south1",
    "us-west1",
    "us-west4",
    "europe-central2",
    "europe-north1",
    "europe-southwest1",
    "europe-west1",
    "europe-west4",
    "europe-west8",
    "europe-west9",
)


@dataclass(frozen=True, kw_only=True)
class RegionMix(Capacity):
    """Regions of uneven capacity and latency: (concurrency, latency_s) per region."""

    per_region: tuple[tuple[int, float], ...] = ()

    @property
    def jobs_per_s(self) -> float:
        """The physical limit: the sum of each region's concurrency over its latency."""
        return sum(calls / latency for calls, latency in self.per_region)

    @property
    def total_concurrency(self) -> int:
        """Calls all regions hold at once."""
        return sum(calls for calls, _ in self.per_region)

    def standin_config(self) -> dict[str, Any]:
        """Each region's capacity and latency."""
        return {
            "regions": {
                region: {"capacity": calls, "latency_s": latency}
                for region, (calls, latency) in zip(self.regions, self.per_region, strict=True)
            }
        }

    def describe(self) -> str:
        """One line for the report."""
        calls = sorted({c for c, _ in self.per_region})
        latencies = sorted({lat for _, lat in self.per_region})
        return (
            f"{len(self.regions)} regions, {calls[0]}-{calls[-1]} concurrent calls each "
            f"({self.total_concurrency} in all), {latencies[0]:g}-{latencies[-1]:g} s calls "
            f"= {self.jobs_per_s:,.0f} calls/s"
        )


def seed_mix() -> RegionMix:
    """The seed's 14 regions: capacities from 10 to 200, latencies from 1 to 5 s."""
    capacities = (10, 200, 25, 10, 100, 50, 200, 10, 150, 25, 100, 50, 200, 10)
    latencies = (1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 2.5, 3.5, 4.5, 1.0, 2.0, 3.0, 4.0, 5.0)
    return RegionMix(
        regions=SEED_REGIONS, per_region=tuple(zip(capacities, latencies, strict=True))
    )


def uniform(concurrency: int, latency_s: float) -> Capacity:
    """The scenario-1 regions with another capacity and latency."""
    return Capacity(concurrency=concurrency, latency_s=latency_s)


def total_concurrency(capacity: Capacity) -> int:
    """Calls all of `capacity`'s regions hold at once."""
    if isinstance(capacity, RegionMix):
        return capacity.total_concurrency
    return len(capacity.regions) * capacity.concurrency


def run_direct(
    log_dir: Path, capacity: Capacity, *, jobs: int, timeout_s: float = 400.0
) -> GoodputResult:
    """The direct round-robin client, on a fresh stand-in of `capacity`."""
    standin = start_standin(log_dir, capacity.standin_config())
    try:
        meter = CpuMeter({"stand-in": standin.pid})
        latencies, statuses, completion_s = run_async(
            _direct(standin.url, capacity, jobs, timeout_s)
        )
        cpu = meter.used()
    finally:
        standin.terminate(timeout=10)
    calls = sum(statuses.values())
    ideal_s = jobs / capacity.jobs_per_s
    succeeded = len(latencies)
    return GoodputResult(
        mode="direct",
        strategy="direct",
        label="direct round-robin client, backoff on 429 (no dispatcher)",
        jobs=jobs,
        capacity=capacity.describe(),
        limit_jobs_per_s=capacity.jobs_per_s,
        completion_s=round(completion_s, 2),
        goodput=round(ideal_s / completion_s, 3) if completion_s > 0 else 0.0,
        calls=calls,
        calls_per_job=round(calls / jobs, 3),
        share_429=round(statuses[429] / calls, 4) if calls else 0.0,
        calls_by_status={str(k): v for k, v in sorted(statuses.items())},
        latency_p50_s=round(percentile(latencies, 0.50), 3),
        latency_p95_s=round(percentile(latencies, 0.95), 3),
        latency_p99_s=round(percentile(latencies, 0.99), 3),
        statuses={"succeeded": succeeded},
        lost=jobs - succeeded,
        duplicate_successes=0,
        cpu_s=cpu,
        submit_s=0.0,
    )


async def _direct(
    url: str, capacity: Capacity, jobs: int, timeout_s: float
) -> tuple[list[float], Counter[int], float]:
    in_flight = total_concurrency(capacity)
    http = RawHttp(url, in_flight)
    regions = itertools.cycle(capacity.regions)
    body = json.dumps(prompt("direct")).encode()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    remaining = iter(range(jobs))
    rng = random.Random(7)
    started = time.monotonic()
    deadline = started + timeout_s

    async def client() -> None:
        for _ in remaining:
            began = time.monotonic()
            attempt = 0
            while time.monotonic() < deadline:
                path = (
                    f"/v1/projects/{PROJECT}/locations/{next(regions)}/publishers/google/"
                    f"models/{MODEL}:generateContent"
                )
                status, _, _ = await http.request("POST", path, body)
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.monotonic() - began)
                    break
                attempt += 1
                await asyncio.sleep(min(30.0, 2.0 ** (attempt - 1)) * rng.uniform(0.5, 1.0))

    try:
        await asyncio.gather(*(client() for _ in range(in_flight)))
    finally:
        await http.close()
    return latencies, statuses, time.monotonic() - started


# -- mode 3 at scale: K workers behind the push relay ---------------------------------


@contextlib.contextmanager
def scale_stack(
    emulators: tuple[Emulator, Emulator],
    *,
    log_dir: Path,
    capacity: Capacity,
    workers: int,
    ingresses: int = 2,
    max_window: int = 1000,
    interactive_topic: bool = False,
    **overrides: str,
) -> Iterator[BenchStack]:
    """Mode 3 with `ingresses` ingresses and `workers` workers fed by the push relay.

    The relay pulls from a pull subscription of the emulator and pushes as Pub/Sub push
    would (many at once, spread over the workers), with a 1 s to 10 s retry backoff.
    With `interactive_topic`, INTERACTIVE_TOPIC is set too and its subscription gets a
    relay of its own to the same workers (as deploy.sh gives it a push subscription).
    """
    firestore, pubsub = emulators
    suffix = uuid.uuid4().hex[:10]
    standin = start_standin(log_dir, capacity.standin_config())
    started: list[ServiceProcess] = [standin]
    relays: list[subprocess.Popen[bytes]] = []
    try:
        env = service_env(standin, capacity.regions, **overrides)
        env.update(firestore.env())
        env.update(pubsub.env())
        env.update(
            FIRESTORE_COLLECTION=f"scale-{suffix}",
            FIRESTORE_DATABASE="(default)",
            PUBSUB_TOPIC=f"scale-{suffix}",
        )
        if interactive_topic:
            env["INTERACTIVE_TOPIC"] = f"scale-{suffix}-interactive"
        topics = [env["PUBSUB_TOPIC"], *filter(None, [env.get("INTERACTIVE_TOPIC")])]
        subscriptions = [create_pull_subscription(pubsub, topic=topic) for topic in topics]
        pool = [ServiceProcess.start("worker", env, log_dir=log_dir) for _ in range(workers)]
        started += pool
        for index, subscription in enumerate(subscriptions):
            relays.append(
                spawn_logged(
                    [
                        sys.executable,
                        "-m",
                        "dispatcher_devtools.push_relay",
                        "--subscription",
                        subscription,
                        *itertools.chain.from_iterable(("--worker", f"{w.url}/") for w in pool),
                        "--min-backoff-s",
                        "1",
                        "--max-backoff-s",
                        "10",
                        "--max-window",
                        str(max_window),
                        "--log-level",
                        "WARNING",
                    ],
                    env=base_child_env(pubsub.env()),
                    log_path=log_dir / f"push-relay-{suffix}-{index}.log",
                )
            )
        fronts = [ServiceProcess.start("ingress", env, log_dir=log_dir) for _ in range(ingresses)]
        started += fronts
        yield BenchStack(
            mode="pubsub",
            standin=standin,
            ingress=fronts[0],
            more_ingresses=fronts[1:],
            worker=pool[0],
            more_workers=pool[1:],
            env=env,
        )
    finally:
        for relay in relays:
            stop_process_group(relay, timeout=10)
        for process in started:
            process.terminate(timeout=10)


def create_pull_subscription(pubsub: Emulator, *, topic: str) -> str:
    """A topic and a pull subscription on it (no retry policy: the relay backs off)."""
    base = f"http://{pubsub.host_port}/v1/projects/{PROJECT}"
    name = f"{topic}-pull"
    with httpx.Client(trust_env=False, timeout=30) as http:
        http.put(f"{base}/topics/{topic}", json={}).raise_for_status()
        http.put(
            f"{base}/subscriptions/{name}",
            json={"topic": f"projects/{PROJECT}/topics/{topic}", "ackDeadlineSeconds": 60},
        ).raise_for_status()
    return f"projects/{PROJECT}/subscriptions/{name}"


def store_operations(stack: BenchStack) -> dict[str, float]:
    """Firestore operations counted by every ingress and worker, by kind."""
    totals: dict[str, float] = {}
    with httpx.Client(trust_env=False, timeout=10) as http:
        for process in (*stack.ingresses, *stack.workers):
            text = http.get(f"{process.url}/metrics").text
            for line in text.splitlines():
                if line.startswith("dispatcher_store_operations_total{"):
                    labels, _, value = line.rpartition(" ")
                    kind = labels.split('"')[1]
                    totals[kind] = totals.get(kind, 0.0) + float(value)
    return totals


@dataclass
class StoreCeiling:
    """What the emulators allow: one job's store writes and publish, no dispatcher around."""

    jobs: int
    in_flight: int
    rate_per_s: float
    cpu_ms_per_job: dict[str, float]


def measure_store_ceiling(
    emulators: tuple[Emulator, Emulator], *, jobs: int = 1000, in_flight: int = 64
) -> StoreCeiling:
    """Per job: the create, the publish, the claim and the result write, 64 jobs at a time.

    The same store and publisher code the services run, called straight from this
    process: no HTTP, no push, no Vertex call. Its rate is what the emulators on this
    machine allow the pipeline at best; the dispatcher's mode 3 figures are read as a
    share of it.
    """
    from dispatcher.firestore_store import FirestoreJobStore
    from dispatcher.lifecycle import JobManager, Lifecycle, Progress
    from dispatcher.pubsub import PubSubQueue

    firestore, pubsub = emulators
    suffix = uuid.uuid4().hex[:10]
    base = f"http://{pubsub.host_port}/v1/projects/{PROJECT}"
    httpx.put(f"{base}/topics/ceiling-{suffix}", json={}).raise_for_status()
    env = {**firestore.env(), **pubsub.env()}

    async def go() -> float:
        with _environment(env):
            store = FirestoreJobStore.connect(
                project=PROJECT, database="(default)", collection=f"ceiling-{suffix}"
            )
            queue = PubSubQueue(project=PROJECT, topic=f"ceiling-{suffix}")
        manager = JobManager(
            store,
            Lifecycle(lease_s=60, job_ttl_s=3600, publish_grace_s=60, max_delivery_attempts=5),
        )
        gate = asyncio.Semaphore(in_flight)

        async def one(index: int) -> None:
            async with gate:
                job = manager.new_job(
                    job_id=f"ceiling{index:012d}{suffix}",
                    model=MODEL,
                    region="us-central1",
                    request=prompt(f"ceiling-{index}"),
                )
                await store.create(job)
                await queue.dispatch(job)
                claim = await manager.claim(job.job_id)
                assert claim.lease_token is not None
                await manager.succeed(
                    job.job_id, claim.lease_token, result={"candidates": []}, progress=Progress()
                )

        try:
            started = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(jobs)))
            return time.monotonic() - started
        finally:
            await queue.close()
            await store.close()

    meter = CpuMeter({"firestore": firestore.process.pid, "pubsub": pubsub.process.pid})
    took = run_async(go())
    cpu = meter.used()
    return StoreCeiling(
        jobs=jobs,
        in_flight=in_flight,
        rate_per_s=round(jobs / took, 1),
        cpu_ms_per_job={name: round(seconds / jobs * 1000, 2) for name, seconds in cpu.items()},
    )


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the Google clients built inside, then restore them."""
    import os

    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class ScaleRow:
    """One run of a scale scenario, as the report shows it."""

    scenario: str
    label: str
    run: GoodputResult
    store_ops_per_job: float | None = None
    ceiling_per_s: float | None = None  # the emulators' own (mode 3)
    extra: dict[str, Any] | None = None

    @property
    def bound_per_s(self) -> float:
        """What the run could reach at best: the regions' limit, or the emulators' if lower."""
        limit = self.run.limit_jobs_per_s
        return min(limit, self.ceiling_per_s) if self.ceiling_per_s else limit

    @property
    def share_of_bound(self) -> float:
        """Jobs per second achieved over the bound."""
        rate = self.run.jobs / self.run.completion_s if self.run.completion_s else 0.0
        return round(rate / self.bound_per_s, 3)


@dataclass
class InFlightMemory:
    """What one process holds in flight, and what each call in flight costs it."""

    process: str
    capacity: str
    peak_in_flight: int
    rss_before_mib: float
    rss_peak_mib: float
    kib_per_call: float
    cpu_ms_per_job: float
    share_of_bound: float


def sample_in_flight(
    process: ServiceProcess, stop: threading.Event, samples: list[tuple[float, float]]
) -> None:
    """Every 0.25 s: (calls in flight from /metrics, RSS MiB) of `process`, until `stop`."""
    with httpx.Client(trust_env=False, timeout=5) as http:
        while not stop.wait(0.25):
            try:
                text = http.get(f"{process.url}/metrics").text
            except httpx.HTTPError:
                continue
            in_flight = sum(
                float(line.rpartition(" ")[2])
                for line in text.splitlines()
                if line.startswith("dispatcher_region_in_flight{")
            )
            samples.append((in_flight, rss_mib(process.pid)))


def measure_in_flight(
    stack: BenchStack, process: ServiceProcess, *, capacity: Capacity, jobs: int, role: str
) -> tuple[InFlightMemory, GoodputResult]:
    """Run `jobs` through `stack` while sampling `process`; the figures at its peak."""
    from tests.benchmarks.harness import run_goodput

    strategy = Strategy(key="default", label="this project's default")
    before = rss_mib(process.pid)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_in_flight, args=(process, stop, samples))
    sampler.start()
    try:
        run = run_goodput(stack, strategy=strategy, capacity=capacity, jobs=jobs, timeout_s=600)
    finally:
        stop.set()
        sampler.join()
    peak_in_flight, peak_rss = max(samples, default=(0.0, before))
    row = ScaleRow(scenario="", label="", run=run)
    return (
        InFlightMemory(
            process=role,
            capacity=capacity.describe(),
            peak_in_flight=int(peak_in_flight),
            rss_before_mib=round(before, 1),
            rss_peak_mib=round(peak_rss, 1),
            kib_per_call=round((peak_rss - before) * 1024 / max(peak_in_flight, 1), 2),
            cpu_ms_per_job=round(run.cpu_s.get(role, 0.0) / jobs * 1000, 2),
            share_of_bound=row.share_of_bound,
        ),
        run,
    )
