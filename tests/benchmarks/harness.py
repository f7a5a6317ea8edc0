"""The benchmark harness: real processes on loopback, a load client, and the figures.

Everything here talks HTTP to real processes (the Vertex stand-in, the ingress, the
worker, the emulators) started with `tests.support`. The scenarios in this folder call
`run_goodput` and friends; the smoke test in `tests/integration/test_benchmark_smoke.py`
calls the same code with a small N so the harness cannot rot unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import uvloop

from tests.support.emulators import Emulator
from tests.support.processes import ServiceProcess
from tests.support.stack import PROJECT, start_standin

ROOT: Final = Path(__file__).resolve().parents[2]
MODEL: Final = "gemini-bench"
REGIONS: Final = ("us-central1", "europe-west4", "asia-northeast1", "us-east4")
TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_T = TypeVar("_T")
KEEP_ALIVE_S: Final = 3.0  # reuse a connection only this long (uvicorn's timeout is 5 s)


# -- set-up -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """What the stand-in's regions can serve: K regions x `concurrency` calls of `latency_s`.

    A call past a region's concurrency is answered 429 at once, as a full Vertex region
    (Dynamic Shared Quota) does.
    """

    regions: tuple[str, ...] = REGIONS
    concurrency: int = 12
    latency_s: float = 0.2

    @property
    def jobs_per_s(self) -> float:
        """The physical limit: the regions' combined capacity in calls per second."""
        return len(self.regions) * self.concurrency / self.latency_s

    def standin_config(self) -> dict[str, Any]:
        """The stand-in's start-up config."""
        return {"default": {"capacity": self.concurrency, "latency_s": self.latency_s}}

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"{len(self.regions)} regions x {self.concurrency} concurrent calls x "
            f"{self.latency_s * 1000:.0f} ms = {self.jobs_per_s:,.0f} calls/s"
        )


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """A way of spreading jobs over regions, as settings (env vars) of the services."""

    key: str
    label: str
    single_region: bool = False
    env: Mapping[str, str] = field(default_factory=dict)


STRATEGIES: Final = (
    Strategy(key="single", label="one region only", single_region=True),
    Strategy(
        key="naive",
        label="round-robin, retries in the same region",
        env={"REGION_STRATEGY": "naive"},
    ),
    Strategy(key="default", label="this project's default"),
)


def service_env(
    standin: ServiceProcess, regions: Sequence[str], **overrides: str
) -> dict[str, str]:
    """Settings of an ingress or worker: the defaults, pointed at the stand-in."""
    env = {
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "MODEL_ID": MODEL,
        "MODEL_CONFIG": json.dumps([{"model_id": MODEL, "supported_regions": list(regions)}]),
        "VERTEX_API_ENDPOINT": standin.url,
    }
    env.update(overrides)
    return env


@dataclass
class BenchStack:
    """The processes of one benchmark run."""

    mode: str
    standin: ServiceProcess
    ingress: ServiceProcess
    worker: ServiceProcess | None = None
    env: dict[str, str] = field(default_factory=dict)
    # The scale scenarios: more ingresses (submissions alternate), more workers.
    more_ingresses: list[ServiceProcess] = field(default_factory=list)
    more_workers: list[ServiceProcess] = field(default_factory=list)

    @property
    def ingresses(self) -> list[ServiceProcess]:
        """Every ingress."""
        return [self.ingress, *self.more_ingresses]

    @property
    def workers(self) -> list[ServiceProcess]:
        """Every worker."""
        return [*([self.worker] if self.worker else []), *self.more_workers]

    def processes(self) -> dict[str, ServiceProcess]:
        """The dispatcher's processes and the stand-in, by role (one of each role)."""
        named = {"ingress": self.ingress, "stand-in": self.standin}
        if self.worker is not None:
            named["worker"] = self.worker
        return named

    def process_groups(self) -> dict[str, list[int]]:
        """Every process's group, by role: what CPU figures add up."""
        groups = {"ingress": [p.pid for p in self.ingresses], "stand-in": [self.standin.pid]}
        if self.workers:
            groups["worker"] = [p.pid for p in self.workers]
        return groups

    def close(self) -> None:
        """Stop every process of the run."""
        for process in (*self.ingresses, *self.workers, self.standin):
            process.terminate(timeout=10)


@contextlib.contextmanager
def bench_stack(
    mode: str,
    *,
    log_dir: Path,
    standin_config: Mapping[str, Any],
    regions: Sequence[str],
    emulators: tuple[Emulator, Emulator] | None = None,
    **overrides: str,
) -> Iterator[BenchStack]:
    """Start the stand-in, the worker (mode 3) and one ingress; stop them all on exit.

    Args:
        mode: "memory" (mode 1) or "pubsub" (mode 3).
        log_dir: Where the processes log.
        standin_config: The stand-in's behaviour.
        regions: The model's supported regions (MODEL_CONFIG).
        emulators: (firestore, pubsub), required in mode 3.
        overrides: Further settings, by env var name.
    """
    standin = start_standin(log_dir, standin_config)
    stack: BenchStack | None = None
    worker: ServiceProcess | None = None
    subscription: tuple[Emulator, str] | None = None
    try:
        env = service_env(standin, regions, **overrides)
        if mode == "pubsub":
            assert emulators is not None, "mode 3 needs the emulators"
            firestore, pubsub = emulators
            suffix = uuid.uuid4().hex[:10]
            env.update(firestore.env())
            env.update(pubsub.env())
            env.update(
                FIRESTORE_COLLECTION=f"bench-{suffix}",
                FIRESTORE_DATABASE="(default)",
                PUBSUB_TOPIC=f"bench-{suffix}",
            )
            worker = ServiceProcess.start("worker", env, log_dir=log_dir)
            subscription = (pubsub, f"bench-push-{suffix}")
            # The worker's default PUSH_ACK_DEADLINE_S, and the retry policy the README
            # recommends for production.
            create_push_subscription(
                pubsub,
                topic=env["PUBSUB_TOPIC"],
                subscription=subscription[1],
                endpoint=f"{worker.url}/",
                ack_deadline_s=600,
                min_retry_delay="10s",
                max_retry_delay="600s",
            )
        ingress = ServiceProcess.start("ingress", env, log_dir=log_dir)
        stack = BenchStack(mode=mode, standin=standin, ingress=ingress, worker=worker, env=env)
        yield stack
    finally:
        if subscription is not None:
            # Left behind, it would keep pushing its backlog at a closed port.
            delete_subscription(*subscription)
        if stack is not None:
            stack.close()
        else:
            for process in (worker, standin):
                if process is not None:
                    process.terminate(timeout=10)


def create_push_subscription(
    pubsub: Emulator,
    *,
    topic: str,
    subscription: str,
    endpoint: str,
    ack_deadline_s: int,
    min_retry_delay: str = "10s",
    max_retry_delay: str = "600s",
) -> None:
    """Create a topic and a push subscription through the emulator's REST API.

    The same resources as `infra/pubsub.sh` (which the integration tests exercise), in
    milliseconds instead of the seconds each gcloud call takes to start.
    """
    base = f"http://{pubsub.host_port}/v1/projects/{PROJECT}"
    with httpx.Client(trust_env=False, timeout=30) as http:
        http.put(f"{base}/topics/{topic}", json={}).raise_for_status()
        http.put(
            f"{base}/subscriptions/{subscription}",
            json={
                "topic": f"projects/{PROJECT}/topics/{topic}",
                "pushConfig": {"pushEndpoint": endpoint},
                "ackDeadlineSeconds": ack_deadline_s,
                "retryPolicy": {
                    "minimumBackoff": min_retry_delay,
                    "maximumBackoff": max_retry_delay,
                },
            },
        ).raise_for_status()


def delete_subscription(pubsub: Emulator, subscription: str) -> None:
    """Delete a subscription through the emulator's REST API (best effort)."""
    url = f"http://{pubsub.host_port}/v1/projects/{PROJECT}/subscriptions/{subscription}"
    with contextlib.suppress(httpx.HTTPError), httpx.Client(trust_env=False, timeout=10) as http:
        http.delete(url)


# -- measuring processes ----------------------------------------------------------------


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process in a process group."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def self_cpu_s() -> float:
    """CPU seconds used so far by this (the load-generating) process."""
    usage = os.times()
    return usage.user + usage.system


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class CpuMeter:
    """CPU seconds used by each named process group (and this process) between two points."""

    def __init__(self, groups: Mapping[str, int | Sequence[int]]) -> None:
        self._groups = {
            name: [pgids] if isinstance(pgids, int) else list(pgids)
            for name, pgids in groups.items()
        }
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        reading = {
            name: sum(group_cpu_s(pgid) for pgid in pgids) for name, pgids in self._groups.items()
        }
        reading["load client"] = self_cpu_s()
        return reading

    def used(self) -> dict[str, float]:
        """CPU seconds since the meter was created, by name."""
        end = self._read()
        return {name: round(end[name] - self._start[name], 2) for name in end}


# -- the load client --------------------------------------------------------------------


def prompt(text: str) -> dict[str, Any]:
    """A minimal GenerateContentRequest."""
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client for loopback load, about 5x cheaper than aiohttp.

    On a 2-core machine every millisecond the load client spends is taken from the
    services it measures; this client only writes prepared bytes and reads a
    Content-Length body (what uvicorn answers for these endpoints).
    """

    def __init__(
        self, base_url: str, connections: int, *, headers: Mapping[str, str] | None = None
    ) -> None:
        host_port = base_url.removeprefix("http://").rstrip("/")
        self._host, _, port = host_port.partition(":")
        self._port = int(port or 80)
        self._host_header = host_port.encode()
        # Sent with every request (e.g. X-API-Key: the caller a job belongs to).
        self._extra_headers = b"".join(
            f"\r\n{name}: {value}".encode() for name, value in (headers or {}).items()
        )
        # (reader, writer, last used): uvicorn closes a connection idle for 5 s.
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = (
            asyncio.Queue()
        )
        self._open = 0
        self._limit = connections

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request; returns (status, lower-cased headers, body)."""
        reader, writer = await self._connection()
        head = (
            f"{method} {path} HTTP/1.1\r\n".encode()
            + b"Host: "
            + self._host_header
            + self._extra_headers
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        try:
            writer.write(head + body)
            raw_head = await reader.readuntil(b"\r\n\r\n")
            lines = raw_head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
            payload = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        except BaseException:
            self._open -= 1
            writer.close()
            raise
        if headers.get(b"connection") == b"close":
            self._open -= 1
            writer.close()
        else:
            self._idle.put_nowait((reader, writer, time.monotonic()))
        return status, headers, payload

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while True:
            if self._idle.empty() and self._open < self._limit:
                self._open += 1
                try:
                    return await asyncio.open_connection(self._host, self._port)
                except BaseException:
                    self._open -= 1
                    raise
            reader, writer, last_used = await self._idle.get()
            if time.monotonic() - last_used < KEEP_ALIVE_S:
                return reader, writer
            self._open -= 1  # the server may have closed it already: never reuse it
            writer.close()

    async def close(self) -> None:
        """Close every idle connection."""
        while not self._idle.empty():
            _, writer, _ = self._idle.get_nowait()
            writer.close()
        self._open = 0


class Alternating(RawHttp):
    """Requests sent to several servers in turn (the ingresses behind a load balancer).

    A RawHttp in shape only (what `submit_all` and the tracker call): the connections
    are the clients'.
    """

    def __init__(self, clients: Sequence[RawHttp]) -> None:
        self._clients = list(clients)
        self._turn = 0

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request to the next server."""
        client = self._clients[self._turn % len(self._clients)]
        self._turn += 1
        return await client.request(method, path, body)

    async def close(self) -> None:
        """Close every client."""
        for client in self._clients:
            await client.close()


@dataclass
class Submission:
    """One job as the client saw it."""

    text: str
    sent_at: float  # wall clock (time.time()), comparable with the records' timestamps
    job_id: str | None = None
    view: dict[str, Any] | None = None


async def submit_all(
    ingress: RawHttp,
    texts: Sequence[str],
    *,
    concurrency: int,
    deadline: float,
    body_for: Callable[[str], Mapping[str, Any]] = prompt,
) -> tuple[list[Submission], Counter[int]]:
    """POST every prompt as fast as the ingress takes them, `concurrency` at a time.

    A 429 (admission full) is retried after its Retry-After, a 503 after 0.1 s: the job
    was not accepted, so trying again is what a client does. `body_for` turns a prompt's
    text into the POST body (default: the text alone, no job options).

    Returns:
        The accepted submissions in order, and the count of answers by status.
    """
    answers: Counter[int] = Counter()
    results: list[Submission | None] = [None] * len(texts)
    next_index = 0

    async def submitter() -> None:
        nonlocal next_index
        while next_index < len(texts) and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            text = texts[index]
            body = json.dumps(body_for(text)).encode()
            while time.monotonic() < deadline:
                sent_at = time.time()
                status, headers, answer = await ingress.request("POST", "/generate", body)
                answers[status] += 1
                if status == 202:
                    job_id = json.loads(answer)["job_id"]
                    results[index] = Submission(text=text, sent_at=sent_at, job_id=job_id)
                    break
                if status == 429:
                    await asyncio.sleep(float(headers.get(b"retry-after", b"1")))
                elif status == 503:
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"POST /generate answered {status}: {answer!r}")

    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return [s for s in results if s is not None], answers


async def read_job(ingress: RawHttp, job_id: str) -> dict[str, Any]:
    """GET /jobs/{id} (200 expected)."""
    status, _, body = await ingress.request("GET", f"/jobs/{job_id}")
    if status != 200:
        raise AssertionError(f"GET /jobs/{job_id} answered {status}: {body[:300]!r}")
    return dict(json.loads(body))


async def standin_successes(standin: RawHttp) -> tuple[int, int]:
    """(calls answered 200, all calls) so far, from the stand-in's counters."""
    _, _, body = await standin.request("GET", "/_standin/stats")
    stats = json.loads(body)
    successes = sum(r["by_status"].get("200", 0) for r in stats["regions"].values())
    return successes, int(stats["total_calls"])


async def track_until_finished(
    ingress: RawHttp,
    standin: RawHttp,
    submissions: list[Submission],
    *,
    jobs: int,
    submitting: Callable[[], bool],
    deadline: float,
    concurrency: int = 16,
) -> None:
    """Wait until every accepted job is finished, disturbing the run as little as possible.

    While the stand-in is busy, only its counters are read (no load on the ingress);
    once it has answered 200 to every job, or been idle for 2 s (retries waiting,
    failures), each unfinished job is read once with GET /jobs/{id}, again every 0.5 s
    for those still unfinished. The figures come from the job records, so when they are
    read does not change them.
    """
    idle_since = time.monotonic()
    last_calls = -1
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if submitting():
            continue
        successes, calls = await standin_successes(standin)
        if calls != last_calls:
            last_calls, idle_since = calls, time.monotonic()
        if successes >= jobs or time.monotonic() - idle_since >= 2.0:
            break
    semaphore = asyncio.Semaphore(concurrency)

    async def refresh(submission: Submission) -> None:
        assert submission.job_id is not None
        async with semaphore:
            submission.view = await read_job(ingress, submission.job_id)

    unfinished = list(submissions)
    while unfinished and time.monotonic() < deadline:
        await asyncio.gather(*(refresh(s) for s in unfinished))
        unfinished = [s for s in unfinished if (s.view or {}).get("status") not in TERMINAL]
        if unfinished:
            await asyncio.sleep(0.5)


# -- scenario 1/2: goodput ---------------------------------------------------------------


@dataclass
class GoodputResult:
    """The figures of one goodput run (scenario 1 or 2)."""

    mode: str
    strategy: str
    label: str
    jobs: int
    capacity: str
    limit_jobs_per_s: float
    completion_s: float
    goodput: float
    calls: int
    calls_per_job: float
    share_429: float
    calls_by_status: dict[str, int]
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    statuses: dict[str, int]
    lost: int
    duplicate_successes: int
    cpu_s: dict[str, float]
    submit_s: float
    # (t, region, status) of every upstream call, t from the run's start (for the charts).
    calls_log: list[tuple[float, str, int]] = field(default_factory=list, repr=False)
    outage: tuple[float, float] | None = None

    def summary(self) -> dict[str, Any]:
        """The figures without the call log."""
        doc = asdict(self)
        doc.pop("calls_log")
        return doc


def percentile(values: Sequence[float], share: float) -> float:
    """The `share` quantile (0..1) by the nearest-rank method; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return ordered[rank]


def parse_time(text: str) -> float:
    """An RFC 3339 timestamp as POSIX seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_goodput(
    stack: BenchStack,
    *,
    strategy: Strategy,
    capacity: Capacity,
    jobs: int,
    concurrency: int = 16,
    timeout_s: float = 240.0,
    outage: tuple[str, float, float] | None = None,
) -> GoodputResult:
    """Submit `jobs` jobs as fast as the ingress accepts them and wait for every one.

    Args:
        stack: A running stack (its stand-in is reset first).
        strategy: Which strategy the stack runs (for the labels).
        capacity: The stand-in's regions (for the physical limit).
        jobs: N.
        concurrency: Submissions in flight at once.
        timeout_s: Give up waiting after this long; unfinished jobs count as lost.
        outage: (region, start_s, end_s): answer 503 in that region in that window.
    """
    http = httpx.Client(trust_env=False, timeout=30)
    try:
        reset = http.post(f"{stack.standin.url}/_standin/reset")
        reset.raise_for_status()
        run_id = uuid.uuid4().hex[:8]
        texts = [f"{strategy.key}-{run_id}-{i}" for i in range(jobs)]
        meter = CpuMeter(stack.process_groups())
        started = time.time()
        submissions, submitted_s = run_async(
            _drive(stack, texts, concurrency, timeout_s, outage, started)
        )
        cpu = meter.used()
        calls = http.get(f"{stack.standin.url}/_standin/calls").json()
    finally:
        http.close()
    views = [s.view for s in submissions if s.view is not None]
    statuses = Counter(str(v["status"]) for v in views)
    finished = [v for v in views if v["status"] in TERMINAL]
    lost = jobs - sum(n for status, n in statuses.items() if status == "succeeded")
    latencies = [
        parse_time(v["updated_at"]) - parse_time(v["created_at"])
        for v in finished
        if v["status"] == "succeeded"
    ]
    end = max((parse_time(v["updated_at"]) for v in finished), default=time.time())
    completion_s = end - started
    by_status = Counter(int(c["status"]) for c in calls)
    successes = Counter(c["text"] for c in calls if c["status"] == 200)
    total_calls = len(calls)
    ideal_s = jobs / capacity.jobs_per_s
    return GoodputResult(
        mode=stack.mode,
        strategy=strategy.key,
        label=strategy.label,
        jobs=jobs,
        capacity=capacity.describe(),
        limit_jobs_per_s=capacity.jobs_per_s,
        completion_s=round(completion_s, 2),
        goodput=round(ideal_s / completion_s, 3) if completion_s > 0 else 0.0,
        calls=total_calls,
        calls_per_job=round(total_calls / jobs, 3),
        share_429=round(by_status[429] / total_calls, 4) if total_calls else 0.0,
        calls_by_status={str(k): v for k, v in sorted(by_status.items())},
        latency_p50_s=round(percentile(latencies, 0.50), 3),
        latency_p95_s=round(percentile(latencies, 0.95), 3),
        latency_p99_s=round(percentile(latencies, 0.99), 3),
        statuses=dict(statuses),
        lost=lost,
        duplicate_successes=sum(n - 1 for n in successes.values() if n > 1),
        cpu_s=cpu,
        submit_s=round(submitted_s, 2),
        calls_log=[(round(c["t"] + c["latency_s"], 3), c["region"], c["status"]) for c in calls],
        outage=(outage[1], outage[2]) if outage else None,
    )


async def _drive(
    stack: BenchStack,
    texts: Sequence[str],
    concurrency: int,
    timeout_s: float,
    outage: tuple[str, float, float] | None,
    started: float,
) -> tuple[list[Submission], float]:
    deadline = time.monotonic() + timeout_s
    accepted: list[Submission] = []
    submitting = True
    ingress = Alternating([RawHttp(p.url, concurrency + 16) for p in stack.ingresses])
    standin = RawHttp(stack.standin.url, 2)
    try:
        outage_task = asyncio.create_task(_outage(standin, *outage)) if outage else None
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
                ingress, texts, concurrency=concurrency, deadline=deadline
            )
            accepted.extend(submissions)
            submitted_s = time.time() - started
        finally:
            submitting = False
        await tracker
        if outage_task is not None:
            await outage_task
    finally:
        await ingress.close()
        await standin.close()
    return accepted, submitted_s


async def _outage(standin: RawHttp, region: str, start_s: float, end_s: float) -> None:
    """Switch `region` to 503 from `start_s` to `end_s` after the run's start."""
    began = time.monotonic()
    path = f"/_standin/regions/{region}"
    await asyncio.sleep(start_s)
    await standin.request("PATCH", path, json.dumps({"status": 503}).encode())
    await asyncio.sleep(max(0.0, end_s - (time.monotonic() - began)))
    await standin.request("PATCH", path, json.dumps({"status": 200}).encode())


@dataclass
class Ceiling:
    """What a client holding exactly the capacity in flight gets, straight from the stand-in."""

    calls_in_flight: int
    duration_s: float
    successes: int
    calls_by_status: dict[str, int]
    rate_per_s: float
    share_of_limit: float


def measure_ceiling(log_dir: Path, capacity: Capacity, *, duration_s: float = 5.0) -> Ceiling:
    """The set-up's own ceiling: no dispatcher, a cheap client, every slot always busy.

    Each of `concurrency` loops per region sends its next call the moment the last one is
    answered, so what is lost against the limit is the HTTP round trip and the stand-in's
    own CPU on this machine, the share no dispatcher can win back.
    """
    standin = start_standin(log_dir, capacity.standin_config())
    try:

        async def go() -> tuple[Counter[int], float]:
            http = RawHttp(standin.url, len(capacity.regions) * capacity.concurrency)
            body = json.dumps(prompt("ceiling")).encode()
            statuses: Counter[int] = Counter()
            started = time.monotonic()
            end = started + duration_s

            async def loop(region: str) -> None:
                path = (
                    f"/v1/projects/{PROJECT}/locations/{region}/publishers/google/models/"
                    f"{MODEL}:generateContent"
                )
                while time.monotonic() < end:
                    status, _, _ = await http.request("POST", path, body)
                    statuses[status] += 1

            try:
                await asyncio.gather(
                    *(loop(r) for r in capacity.regions for _ in range(capacity.concurrency))
                )
            finally:
                await http.close()
            return statuses, time.monotonic() - started

        statuses, took = run_async(go())
    finally:
        standin.terminate(timeout=10)
    rate = statuses[200] / took
    return Ceiling(
        calls_in_flight=len(capacity.regions) * capacity.concurrency,
        duration_s=round(took, 2),
        successes=statuses[200],
        calls_by_status={str(k): v for k, v in sorted(statuses.items())},
        rate_per_s=round(rate, 1),
        share_of_limit=round(rate / capacity.jobs_per_s, 3),
    )


def per_second(
    calls_log: Sequence[tuple[float, str, int]], *, status: int | None, bucket_s: float = 0.5
) -> dict[str, list[tuple[float, float]]]:
    """Calls per second by region over time (`status` None: every non-200 but 429 too)."""
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for t, region, code in calls_log:
        if status is None or code == status:
            counts[region][int(t // bucket_s)] += 1
    series: dict[str, list[tuple[float, float]]] = {}
    for region, buckets in counts.items():
        last = max(buckets)
        series[region] = [(i * bucket_s, buckets.get(i, 0) / bucket_s) for i in range(last + 1)]
    return series


def run_async(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine on uvloop (cheaper per request than asyncio's default loop)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


# -- machine ------------------------------------------------------------------------------


def machine() -> str:
    """One line: CPU model and count, memory, OS, Python."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    os_name = platform.platform(terse=True)
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return (
        f"{os.cpu_count()} x {model}, {mem_gib:.0f} GiB RAM, {os_name}, "
        f"Python {platform.python_version()}"
    )


def git_revision() -> str:
    """The commit the tree is at, with `+changes` when it differs from it.

    The report's own outputs (BENCHMARKS.md, docs/benchmarks/) do not count: the charts
    are written before the report, and a previous run's files may be uncommitted.
    """
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)BENCHMARKS.md",
            ":(exclude)docs/benchmarks",
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+changes" if dirty else head


def _git(*args: str) -> str:
    """What a git command prints in the repository, stripped."""
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.strip()


def median(values: Sequence[float]) -> float:
    """The median, 0 for no values."""
    return statistics.median(values) if values else 0.0


# -- scenario 3: ingress overhead --------------------------------------------------------

LUA_DIR: Final = Path(__file__).resolve().parent / "lua"


def wrk_missing_reason() -> str | None:
    """Why wrk cannot run here, or None."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian: apt-get install -y wrk; run.sh installs it as root)"
    return None


@dataclass
class WrkResult:
    """One wrk run against one endpoint."""

    mode: str
    endpoint: str
    load: str
    connections: int
    duration_s: float
    requests: int
    rate_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: int
    cpu_s: dict[str, float]


def run_wrk(
    stack: BenchStack,
    *,
    endpoint: str,
    load: str,
    script: str,
    connections: int,
    duration_s: float,
    delay_ms: int = 0,
    job_ids_file: Path | None = None,
) -> WrkResult:
    """Run wrk (one thread, `connections` connections) with a Lua script from lua/.

    Args:
        stack: The running stack; wrk drives its ingress.
        endpoint: Label, e.g. "POST /generate".
        load: Label of the load shape.
        script: File name in lua/.
        connections: Connections kept busy.
        duration_s: How long.
        delay_ms: Pause per connection between requests (pacing), 0 for none.
        job_ids_file: For get_job.lua, the ids to read.
    """
    env = dict(os.environ, WRK_DELAY_MS=str(delay_ms))
    if job_ids_file is not None:
        env["WRK_JOB_IDS"] = str(job_ids_file)
    meter = CpuMeter({name: p.pid for name, p in stack.processes().items()})
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s:g}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA_DIR / script),
            stack.ingress.url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=duration_s + 60,
        check=True,
    )
    cpu = meter.used()
    cpu.pop("load client", None)
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK_JSON "))
    doc = json.loads(line.removeprefix("WRK_JSON "))
    seconds = doc["duration_us"] / 1e6
    return WrkResult(
        mode=stack.mode,
        endpoint=endpoint,
        load=load,
        connections=connections,
        duration_s=round(seconds, 2),
        requests=doc["requests"],
        rate_per_s=round(doc["requests"] / seconds, 1),
        p50_ms=doc["p50_us"] / 1000,
        p90_ms=doc["p90_us"] / 1000,
        p99_ms=doc["p99_us"] / 1000,
        max_ms=doc["max_us"] / 1000,
        statuses={str(k): v for k, v in sorted(doc["statuses"].items())},
        errors=doc["errors"],
        cpu_s=cpu,
    )


@dataclass
class AddedLatency:
    """The dispatcher's added latency per job against calling the stand-in directly."""

    mode: str
    jobs: int
    upstream_latency_s: float
    direct_p50_ms: float
    direct_p99_ms: float
    job_p50_ms: float
    job_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    poll_interval_ms: float


def measure_added_latency(
    stack: BenchStack, *, jobs: int, upstream_latency_s: float, poll_s: float = 0.002
) -> AddedLatency:
    """One job at a time: POST, poll GET until finished; against POSTing the stand-in itself.

    The client's view (submit to first finished GET) includes up to one poll interval.
    """
    region = REGIONS[0]
    path = (
        f"/v1/projects/{PROJECT}/locations/{region}/publishers/google/models/"
        f"{MODEL}:generateContent"
    )

    async def measure() -> tuple[list[float], list[float]]:
        standin = RawHttp(stack.standin.url, 1)
        ingress = RawHttp(stack.ingress.url, 1)
        direct: list[float] = []
        via: list[float] = []
        try:
            # Every region the same, so it does not matter where the dispatcher sends a job.
            status, _, _ = await standin.request(
                "PUT",
                "/_standin/config",
                json.dumps({"default": {"latency_s": upstream_latency_s}}).encode(),
            )
            assert status == 200
            for index in range(jobs):
                body = json.dumps(prompt(f"direct-{index}")).encode()
                began = time.perf_counter()
                status, _, _ = await standin.request("POST", path, body)
                direct.append(time.perf_counter() - began)
                assert status == 200
            for index in range(jobs):
                body = json.dumps(prompt(f"added-{index}")).encode()
                began = time.perf_counter()
                status, _, answer = await ingress.request("POST", "/generate", body)
                assert status == 202, answer
                job_id = json.loads(answer)["job_id"]
                while True:
                    view = await read_job(ingress, job_id)
                    if view["status"] in TERMINAL:
                        break
                    await asyncio.sleep(poll_s)
                via.append(time.perf_counter() - began)
                assert view["status"] == "succeeded", view
        finally:
            await standin.close()
            await ingress.close()
        return direct, via

    direct, via = run_async(measure())
    ms = 1000.0
    return AddedLatency(
        mode=stack.mode,
        jobs=jobs,
        upstream_latency_s=upstream_latency_s,
        direct_p50_ms=round(percentile(direct, 0.5) * ms, 2),
        direct_p99_ms=round(percentile(direct, 0.99) * ms, 2),
        job_p50_ms=round(percentile(via, 0.5) * ms, 2),
        job_p99_ms=round(percentile(via, 0.99) * ms, 2),
        added_p50_ms=round((percentile(via, 0.5) - percentile(direct, 0.5)) * ms, 2),
        added_p99_ms=round((percentile(via, 0.99) - percentile(direct, 0.99)) * ms, 2),
        poll_interval_ms=poll_s * ms,
    )


# -- scenario 4: memory -------------------------------------------------------------------


@dataclass
class MemoryResult:
    """Resident memory of the mode-1 ingress while jobs finish."""

    jobs: int
    memory_max_jobs: int
    rss_start_mib: float
    rss_end_mib: float
    samples: list[tuple[int, float]]  # (finished jobs, RSS MiB)
    seconds: float
    first_job_evicted: bool
    cpu_s: dict[str, float]


def run_memory(
    stack: BenchStack, *, jobs: int, memory_max_jobs: int, sample_every: int, timeout_s: float
) -> MemoryResult:
    """Push `jobs` jobs through the ingress and sample its RSS every `sample_every` finished."""

    async def drive() -> tuple[list[tuple[int, float]], str | None, bool]:
        ingress = RawHttp(stack.ingress.url, 8)
        standin = RawHttp(stack.standin.url, 1)
        samples = [(0, rss_mib(stack.ingress.pid))]
        deadline = time.monotonic() + timeout_s
        texts = [f"mem-{i}" for i in range(jobs)]
        first_id: str | None = None
        try:
            submitting = asyncio.create_task(
                submit_all(ingress, texts[:1], concurrency=1, deadline=deadline)
            )
            accepted, _ = await submitting
            first_id = accepted[0].job_id if accepted else None
            rest = asyncio.create_task(
                submit_all(ingress, texts[1:], concurrency=8, deadline=deadline)
            )
            next_sample = sample_every
            while time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                successes, _ = await standin_successes(standin)
                while successes >= next_sample:
                    samples.append((next_sample, rss_mib(stack.ingress.pid)))
                    next_sample += sample_every
                if successes >= jobs and rest.done():
                    break
            await rest
            evicted = False
            if first_id is not None:
                status, _, _ = await ingress.request("GET", f"/jobs/{first_id}")
                evicted = status == 404
        finally:
            await ingress.close()
            await standin.close()
        return samples, first_id, evicted

    meter = CpuMeter({name: p.pid for name, p in stack.processes().items()})
    began = time.monotonic()
    samples, _first, evicted = run_async(drive())
    seconds = time.monotonic() - began
    return MemoryResult(
        jobs=jobs,
        memory_max_jobs=memory_max_jobs,
        rss_start_mib=round(samples[0][1], 1),
        rss_end_mib=round(samples[-1][1], 1),
        samples=[(n, round(r, 1)) for n, r in samples],
        seconds=round(seconds, 1),
        first_job_evicted=evicted,
        cpu_s=meter.used(),
    )


# -- the Pub/Sub emulator's push rate, alone ----------------------------------------------


@dataclass
class PushRate:
    """How fast the Pub/Sub emulator pushes to an endpoint that answers after `delay_s`."""

    messages: int
    delay_s: float
    seconds: float
    rate_per_s: float
    max_in_flight: int


def measure_push_rate(
    pubsub: Emulator, *, log_dir: Path, messages: int, delay_s: float, timeout_s: float
) -> PushRate:
    """Publish `messages` to a topic pushed to a sink that acknowledges after `delay_s`."""
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    sink = ServiceProcess.start(
        "tests.benchmarks.push_sink",
        {"SINK_DELAY_S": str(delay_s)},
        log_dir=log_dir,
        health_path="/stats",
    )
    try:
        suffix = uuid.uuid4().hex[:10]
        topic = f"push-rate-{suffix}"
        create_push_subscription(
            pubsub,
            topic=topic,
            subscription=f"push-rate-{suffix}",
            endpoint=f"{sink.url}/",
            ack_deadline_s=60,
        )
        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host_port
        try:
            publisher = pubsub_v1.PublisherClient()
            topic_path = publisher.topic_path(PROJECT, topic)
            futures = [publisher.publish(topic_path, b"{}") for _ in range(messages)]
            for future in futures:
                future.result(timeout=60)
            publisher.stop()
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous
        deadline = time.monotonic() + timeout_s
        with httpx.Client(trust_env=False, timeout=10) as http:
            while True:
                stats = http.get(f"{sink.url}/stats").json()
                if stats["pushes"] >= messages or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        delete_subscription(pubsub, f"push-rate-{suffix}")
    finally:
        sink.terminate(timeout=5)
    seconds = (stats["last"] or 0) - (stats["first"] or 0)
    return PushRate(
        messages=stats["pushes"],
        delay_s=delay_s,
        seconds=round(seconds, 2),
        rate_per_s=round(stats["pushes"] / seconds, 1) if seconds > 0 else 0.0,
        max_in_flight=stats["max_in_flight"],
    )


# -- profiles ------------------------------------------------------------------------------

# Where a sample's time goes, by the first matching frame from the top of the stack
# (leaf first); the order matters: a Vertex call inside the executor counts as the call.
PROFILE_BUCKETS: Final = (
    ("logging (JSON lines)", ("logging/__init__.py", "dispatcher/logs.py")),
    # The ingress's only aiohttp use is the Vertex call (its protocol callbacks included).
    ("Vertex call: aiohttp client", ("VertexClient._post", "aiohttp/")),
    ("executor: claim, retries, lease, record", ("JobExecutor.", "InProcessQueue._drain")),
    ("POST /generate handler", ("submit (ingress", "accept_job", "dispatcher/validation.py")),
    ("GET /jobs handler", ("job_status (ingress",)),
    (
        "HTTP server + middleware",
        ("uvicorn/", "starlette/", "ingress/security.py", "TraceMiddleware"),
    ),
)


class Profiler:
    """py-spy sampling one process into collapsed stacks, when py-spy can run here."""

    def __init__(self, pid: int, out: Path, *, rate: int = 200) -> None:
        self.out = out
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self._process: subprocess.Popen[bytes] | None = None
        if Path(py_spy).exists():
            command = [py_spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw"]
            self._process = subprocess.Popen(
                [*command, "-r", str(rate), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

    def stop(self) -> dict[str, Any] | None:
        """Stop sampling; the summary (buckets, top frames), or None if py-spy could not run."""
        if self._process is None:
            return None
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return None
        if not self.out.exists():
            return None
        return summarize_profile(self.out.read_text())


def summarize_profile(collapsed: str, top: int = 12) -> dict[str, Any]:
    """Share of samples per bucket and the functions with the most own time."""
    buckets: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _below_event_loop(stack.split(";"))
        own[_frame_name(frames[-1])] += count
        for label, needles in PROFILE_BUCKETS:
            if any(needle in frame for frame in frames for needle in needles):
                buckets[label] += count
                break
        else:
            buckets["event loop, other"] += count
    return {
        "samples": total,
        "buckets": [(label, round(n / total, 3)) for label, n in buckets.most_common()],
        "own": [(name, round(n / total, 3)) for name, n in own.most_common(top)],
    }


def _below_event_loop(frames: list[str]) -> list[str]:
    """The frames under the event loop's own: every loop callback's stack starts with
    `uvicorn.run -> asyncio.run`, which must not file it under the HTTP server."""
    for index in range(len(frames) - 1, -1, -1):
        if frames[index].startswith(("Runner.run ", "run_until_complete ")):
            return frames[index + 1 :] or frames[index:]
    return frames


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    file_name = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file_name})" if file_name else name
