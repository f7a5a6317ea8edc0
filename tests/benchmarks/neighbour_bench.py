"""Scenario 7, the noisy neighbour: one key's flood beside another key's trickle, modes 1 and 3.

Key A (`priority=batch`) submits N jobs at once; `b_delay_s` later key B
(`priority=interactive`) sends one job every `b_interval_s` for `b_duration_s`. The
regions are scenario 1's. Each variant runs on a fresh stack (learned limits and the
fair share's virtual times start from nothing). Mode 1 (one ingress):

- `alone`: B on an idle system, no flood (the baseline of B's latency);
- `fair`: the issue's scenario, A batch, B interactive;
- `same class`: both keys `priority=interactive` (no priority difference: only the
  weighted fair queuing between keys protects B);
- `one key`: B's jobs sent with A's key, the FIFO a dispatcher without per-key shares
  would give (B's job behind the whole backlog);
- `A alone`: A's flood and no B (the total goodput the fair run is held against);
- `weights`: no B; two batch keys, A `weight=3` and C `weight=1`, flood half of N each
  at once (their shares while both have work is what weighted fair queuing promises).

Mode 3 (`scale.scale_stack`: two ingresses, workers behind the push relay, one relay per
subscription): `alone`, `fair` and `A alone` with `INTERACTIVE_TOPIC` set (B's jobs on
a topic and subscription of their own), and `one topic`, the fair run without it (B's
jobs in the subscription behind A's backlog). Mode 3's rate is bounded by the
emulators (section 5's store ceiling), so its flood is smaller.

B's latency is read from its client's side (POST sent to the record's `updated_at`)
and from the record (`created_at` to `updated_at`); A's throughput from its records'
`updated_at`, in B's window and overall.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from tests.benchmarks.harness import (
    TERMINAL,
    Alternating,
    BenchStack,
    Capacity,
    CpuMeter,
    RawHttp,
    Submission,
    bench_stack,
    parse_time,
    percentile,
    run_async,
    submit_all,
    track_until_finished,
)
from tests.benchmarks.scale import scale_stack
from tests.support.emulators import Emulator

MODE_LABELS: Final = {"memory": "mode 1", "pubsub": "mode 3"}


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One way of running the scenario: the mode, who floods, and the keys' policy words."""

    key: str
    label: str
    mode: str = "memory"
    flood: bool = True
    trickle: bool = True  # B sends its jobs
    a_policy: str = "priority=batch weight=1"
    b_policy: str = "priority=interactive"
    b_uses_a_key: bool = False
    # A second batch key flooding beside A (then A and C each send half of the flood).
    c_policy: str | None = None
    interactive_topic: bool = False  # mode 3: INTERACTIVE_TOPIC set

    @property
    def name(self) -> str:
        """Unique over the modes: the test id and the report's lookup."""
        return f"{self.mode}/{self.key}"


VARIANTS: Final = (
    Variant(key="alone", label="B alone, idle system", flood=False),
    Variant(key="fair", label="A batch, B interactive"),
    Variant(
        key="same class",
        label="both interactive",
        a_policy="priority=interactive weight=1",
        b_policy="priority=interactive weight=1",
    ),
    Variant(key="one key", label="B sent with A's key (FIFO)", b_uses_a_key=True),
    Variant(key="A alone", label="A alone (no B)", trickle=False),
    Variant(
        key="weights",
        label="A weight=3, C weight=1, both batch (no B)",
        trickle=False,
        a_policy="priority=batch weight=3",
        c_policy="priority=batch weight=1",
    ),
    Variant(
        key="alone",
        label="B alone, idle system",
        mode="pubsub",
        flood=False,
        interactive_topic=True,
    ),
    Variant(
        key="fair",
        label="A batch, B interactive, INTERACTIVE_TOPIC",
        mode="pubsub",
        interactive_topic=True,
    ),
    Variant(key="one topic", label="A batch, B interactive, one topic", mode="pubsub"),
    Variant(
        key="A alone",
        label="A alone (no B), INTERACTIVE_TOPIC",
        mode="pubsub",
        trickle=False,
        interactive_topic=True,
    ),
)


@dataclass(frozen=True, kw_only=True)
class NeighbourScenario:
    """The flood, the trickle and the regions of one noisy-neighbour run.

    The defaults are the full run; `SMOKE` is the small version of the integration tier.
    """

    jobs: int = 20_000  # A's in mode 1, submitted at once
    # A's in mode 3: at the emulators' ~120 jobs/s (section 5) 20,000 would take ~3 min
    # a variant before the jobs are read back; 12,000 still covers B's window.
    pubsub_jobs: int = 12_000
    b_delay_s: float = 30.0  # from A's first submission to B's first
    b_duration_s: float = 60.0
    b_interval_s: float = 1.0
    capacity: Capacity = field(default_factory=Capacity)
    submit_concurrency: int = 16  # A's submissions in flight
    workers: int = 4  # mode 3 (section 5's best K)
    ingresses: int = 2  # mode 3; each key's requests alternate over them

    @property
    def b_jobs(self) -> int:
        """B's jobs: one per interval for the duration."""
        return round(self.b_duration_s / self.b_interval_s)

    def flood_jobs(self, mode: str) -> int:
        """A's jobs in `mode` (with a second flooding key, A and C get half each)."""
        return self.pubsub_jobs if mode == "pubsub" else self.jobs

    @property
    def max_pending_jobs(self) -> int:
        """MAX_PENDING_JOBS: room for every job of every key, so none is refused."""
        return max(self.jobs, self.pubsub_jobs) + self.b_jobs + 1000

    def timeout_s(self, mode: str = "memory") -> float:
        """How long a variant may take before unfinished jobs count as lost."""
        # Mode 3: at a third of the emulators' ceiling at worst (the soak's 60/s and less).
        rate = self.capacity.jobs_per_s if mode == "memory" else 40.0
        return max(self.b_delay_s + self.b_duration_s, 3 * self.flood_jobs(mode) / rate) + 120

    def construction(self, ceiling_per_s: float | None = None) -> str:
        """The physical facts the figures stand beside, in one paragraph."""
        limit = self.capacity.jobs_per_s
        text = (
            f"Regions as in scenario 1: {self.capacity.describe()}. Mode 1: A's "
            f"{self.jobs:,} jobs need at least {self.jobs / limit:.0f} s at that limit, so "
            f"A's backlog is there for most or all of B's window ({self.b_delay_s:g} s to "
            f"{self.b_delay_s + self.b_duration_s:g} s after A's first submission, one job "
            f"every {self.b_interval_s:g} s, {self.b_jobs} jobs). "
            f"`MAX_PENDING_JOBS={self.max_pending_jobs:,}`, so every job is admitted; A "
            f"submits with {self.submit_concurrency} connections. Mode 3: "
            f"{self.ingresses} ingresses, {self.workers} workers behind the push relay "
            f"(one relay per subscription), A's flood {self.pubsub_jobs:,} jobs"
        )
        if ceiling_per_s:
            bound = min(limit, ceiling_per_s)
            text += (
                f"; the physical limit there is the emulators' ceiling, {ceiling_per_s:,.0f} "
                f"jobs/s measured in this invocation (section 5's store ceiling), not the "
                f"regions' {limit:,.0f}/s, so A's flood needs at least "
                f"{self.pubsub_jobs / bound:.0f} s"
            )
        return text + "."


SMOKE: Final = NeighbourScenario(
    jobs=2000,
    pubsub_jobs=300,
    b_delay_s=1.0,
    b_duration_s=5.0,
    b_interval_s=0.5,
    capacity=Capacity(concurrency=8, latency_s=0.05),
    workers=1,
)


@dataclass
class NeighbourRun:
    """The figures of one variant."""

    variant: str
    mode: str
    label: str
    a_jobs: int
    b_jobs: int
    c_jobs: int
    b_latency_p50_s: float  # POST sent to the record's updated_at
    b_latency_p99_s: float
    b_latency_max_s: float
    b_record_p50_s: float  # the record's created_at to updated_at
    b_record_p99_s: float
    b_upstream_429s: int  # 429s the stand-in answered to B's calls
    a_in_window_per_s: float  # A's jobs final per second while B sends and A has work
    a_overall_per_s: float  # A's jobs over A's first submission to A's last final
    window_per_s: float  # every job final per second while B sends
    overall_per_s: float  # every job over first submission to last final
    busy_per_s: float  # every job final by A's last final, over that time
    limit_per_s: float
    ceiling_per_s: float | None  # mode 3: the emulators' (measured in this invocation)
    a_submit_s: float  # A's first to last accepted submission
    # Finals of A and C while both had work (first submission to the first key's last).
    backlogged_finals: dict[str, int]
    backlogged_s: float
    refused: dict[str, int]  # 429 answers to POST /generate, per key
    statuses: dict[str, dict[str, int]]  # per key
    lost: dict[str, int]  # per key: not final at the end (or never accepted)
    calls_by_status: dict[str, int]
    cpu_s: dict[str, float]
    # (s since the start a B job was sent, its latency s): the chart.
    b_points: list[tuple[float, float]] = field(default_factory=list, repr=False)
    # s since the start at which each A job became final: the chart.
    a_final_at: list[float] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        """The variant's name over the modes (`Variant.name`)."""
        return f"{self.mode}/{self.variant}"

    @property
    def bound_per_s(self) -> float:
        """What the run could reach at best: the regions' limit, or the emulators' if lower."""
        if self.ceiling_per_s:
            return min(self.limit_per_s, self.ceiling_per_s)
        return self.limit_per_s

    @property
    def goodput(self) -> float:
        """Every job per second over the whole run, against the bound."""
        return self.overall_per_s / self.bound_per_s if self.bound_per_s else 0.0

    @property
    def window_goodput(self) -> float:
        """Every job per second while B sends, against the bound."""
        return self.window_per_s / self.bound_per_s if self.bound_per_s else 0.0

    @property
    def weight_ratio(self) -> float | None:
        """A's finals over C's while both had work (the weights variant)."""
        a, c = self.backlogged_finals.get("A", 0), self.backlogged_finals.get("C", 0)
        return a / c if self.c_jobs and c else None

    def summary(self) -> dict[str, Any]:
        """Every figure but the chart's series, for the log."""
        doc = asdict(self)
        doc.pop("b_points")
        doc.pop("a_final_at")
        return doc


def variant(key: str, mode: str = "memory") -> Variant:
    """The variant named `key` in `mode`."""
    return next(v for v in VARIANTS if v.key == key and v.mode == mode)


@dataclass(frozen=True)
class Keys:
    """The callers' API keys (the file holds only their hashes)."""

    a: str
    b: str
    c: str


@contextmanager
def neighbour_stack(
    scenario: NeighbourScenario,
    chosen: Variant,
    *,
    log_dir: Path,
    emulators: tuple[Emulator, Emulator] | None = None,
) -> Iterator[tuple[BenchStack, Keys]]:
    """A fresh stack of `chosen`'s mode with its keys in API_KEYS_FILE.

    The keys file goes to every ingress and worker alike (the worker reads a job's
    priority and weight from its record; the file only gives it the webhook secrets).
    Mode 3 needs `emulators`.
    """
    keys = Keys(*(secrets.token_urlsafe(24) for _ in range(3)))
    path = log_dir / f"keys-{uuid.uuid4().hex[:8]}"
    lines = [
        f"team-a:{_sha256(keys.a)} {chosen.a_policy}",
        f"team-b:{_sha256(keys.b)} {chosen.b_policy}",
    ]
    if chosen.c_policy is not None:
        lines.append(f"team-c:{_sha256(keys.c)} {chosen.c_policy}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if chosen.mode == "pubsub":
        assert emulators is not None, "mode 3 needs the emulators"
        with scale_stack(
            emulators,
            log_dir=log_dir,
            capacity=scenario.capacity,
            workers=scenario.workers,
            ingresses=scenario.ingresses,
            interactive_topic=chosen.interactive_topic,
            API_KEYS_FILE=str(path),
            MAX_PENDING_JOBS=str(scenario.max_pending_jobs),
        ) as stack:
            yield stack, keys
        return
    with bench_stack(
        "memory",
        log_dir=log_dir,
        standin_config=scenario.capacity.standin_config(),
        regions=scenario.capacity.regions,
        emulators=None,  # named, so mypy knows the settings below cannot fill it
        API_KEYS_FILE=str(path),
        MAX_PENDING_JOBS=str(scenario.max_pending_jobs),
    ) as stack:
        yield stack, keys


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def run_neighbour(
    stack: BenchStack,
    keys: Keys,
    scenario: NeighbourScenario,
    chosen: Variant,
    *,
    timeout_s: float | None = None,
    ceiling_per_s: float | None = None,
) -> NeighbourRun:
    """Run one variant on a fresh stack from `neighbour_stack`; read the figures.

    Args:
        stack: The stack (its stand-in is reset first).
        keys: The stack's API keys.
        scenario: The flood, the trickle and the regions.
        chosen: The variant the stack's keys file was written for.
        timeout_s: Give up waiting after this long (default: the scenario's); jobs not
            final by then count as lost.
        ceiling_per_s: Mode 3: the emulators' ceiling, the bound when below the regions'.
    """
    run_id = uuid.uuid4().hex[:8]
    flood = scenario.flood_jobs(chosen.mode) if chosen.flood else 0
    a_count = flood // 2 if chosen.c_policy else flood
    a_texts = [f"a-{run_id}-{i}" for i in range(a_count)]
    c_texts = [f"c-{run_id}-{i}" for i in range(flood - a_count if chosen.c_policy else 0)]
    b_texts = [f"b-{run_id}-{i}" for i in range(scenario.b_jobs if chosen.trickle else 0)]
    floods = [(keys.a, a_texts), *([(keys.c, c_texts)] if c_texts else [])]
    with httpx.Client(trust_env=False, timeout=60) as http:
        http.post(f"{stack.standin.url}/_standin/reset").raise_for_status()
        meter = CpuMeter(stack.process_groups())
        started = time.time()
        drive = _drive(
            stack,
            floods,
            (keys.a if chosen.b_uses_a_key else keys.b, b_texts),
            scenario,
            timeout_s if timeout_s is not None else scenario.timeout_s(chosen.mode),
        )
        (a_subs, *c_parts), b_subs, refused = run_async(drive)
        cpu = meter.used()
        calls = http.get(f"{stack.standin.url}/_standin/calls").json()
    c_subs = c_parts[0] if c_parts else []
    a_final, b_final, c_final = _final(a_subs), _final(b_subs), _final(c_subs)
    b_done = [(s, v) for s, v in b_final if v["status"] == "succeeded"]
    b_latency = [parse_time(v["updated_at"]) - s.sent_at for s, v in b_done]
    b_record = [parse_time(v["updated_at"]) - parse_time(v["created_at"]) for _, v in b_done]
    a_end = [parse_time(v["updated_at"]) for _, v in a_final]
    c_end = [parse_time(v["updated_at"]) for _, v in c_final]
    every_end = [*a_end, *c_end, *(parse_time(v["updated_at"]) for _, v in b_final)]
    window_start = started + scenario.b_delay_s
    window_end = window_start + scenario.b_duration_s
    in_window = sum(1 for t in a_end if window_start <= t < window_end)
    # A's rate beside B counts only the part of B's window in which A still had work.
    a_window_s = min(window_end, max(a_end, default=window_start)) - window_start
    every_in_window = sum(1 for t in every_end if window_start <= t < window_end)
    last = max(every_end, default=started)
    # Total goodput while the flood lasts: B's tail after A's last job is idle capacity.
    a_last = max(a_end, default=started)
    busy = sum(1 for t in every_end if t <= a_last)
    # The weights variant: A and C both have work until the first of them has none.
    both_until = min(max(a_end, default=started), max(c_end, default=started))
    a_sent = [s.sent_at for s in a_subs]
    b_prefix = f"b-{run_id}-"
    return NeighbourRun(
        variant=chosen.key,
        mode=chosen.mode,
        label=chosen.label,
        a_jobs=len(a_texts),
        b_jobs=len(b_texts),
        c_jobs=len(c_texts),
        b_latency_p50_s=round(percentile(b_latency, 0.50), 3),
        b_latency_p99_s=round(percentile(b_latency, 0.99), 3),
        b_latency_max_s=round(max(b_latency, default=0.0), 3),
        b_record_p50_s=round(percentile(b_record, 0.50), 3),
        b_record_p99_s=round(percentile(b_record, 0.99), 3),
        b_upstream_429s=sum(
            1 for c in calls if c["status"] == 429 and str(c["text"]).startswith(b_prefix)
        ),
        a_in_window_per_s=round(in_window / a_window_s, 1) if a_window_s > 0 else 0.0,
        a_overall_per_s=round(len(a_end) / (a_last - started), 1) if a_end else 0.0,
        window_per_s=round(every_in_window / scenario.b_duration_s, 1),
        overall_per_s=round(len(every_end) / (last - started), 1) if last > started else 0.0,
        busy_per_s=round(busy / (a_last - started), 1) if a_last > started else 0.0,
        limit_per_s=scenario.capacity.jobs_per_s,
        ceiling_per_s=ceiling_per_s if chosen.mode == "pubsub" else None,
        a_submit_s=round(max(a_sent) - min(a_sent), 1) if a_sent else 0.0,
        backlogged_finals={
            "A": sum(1 for t in a_end if t <= both_until),
            "C": sum(1 for t in c_end if t <= both_until),
        }
        if c_end
        else {},
        backlogged_s=round(both_until - started, 1) if c_end else 0.0,
        refused={"A": refused[0], "B": refused[1], "C": refused[2]},
        statuses={
            "A": dict(Counter(str(v["status"]) for _, v in a_final)),
            "B": dict(Counter(str(v["status"]) for _, v in b_final)),
            "C": dict(Counter(str(v["status"]) for _, v in c_final)),
        },
        lost={
            "A": len(a_texts) - len(a_final),
            "B": len(b_texts) - len(b_final),
            "C": len(c_texts) - len(c_final),
        },
        calls_by_status={str(k): v for k, v in sorted(Counter(c["status"] for c in calls).items())},
        cpu_s=cpu,
        b_points=[
            (round(s.sent_at - started, 2), round(latency, 3))
            for (s, _), latency in zip(b_done, b_latency, strict=True)
        ],
        a_final_at=[round(t - started, 2) for t in a_end],
    )


def _final(submissions: Sequence[Submission]) -> list[tuple[Submission, dict[str, Any]]]:
    """The submissions whose last view is final, with it."""
    return [(s, s.view) for s in submissions if s.view is not None and s.view["status"] in TERMINAL]


async def _drive(
    stack: BenchStack,
    floods: list[tuple[str, list[str]]],
    trickle: tuple[str, list[str]],
    scenario: NeighbourScenario,
    timeout_s: float,
) -> tuple[list[list[Submission]], list[Submission], tuple[int, int, int]]:
    """The floods (A's, and C's if any) and B's trickle at once, then every job read until final.

    Returns:
        Each flood's accepted submissions, B's, and the 429s to A's, B's and C's POSTs.
    """
    deadline = time.monotonic() + timeout_s

    def client(key: str, connections: int) -> RawHttp:
        # Each key's requests alternate over the ingresses, as behind a load balancer.
        return Alternating(
            [RawHttp(p.url, connections, headers={"X-API-Key": key}) for p in stack.ingresses]
        )

    flood_http = [client(key, scenario.submit_concurrency + 16) for key, _ in floods]
    b_key, b_texts = trickle
    b_http = client(b_key, 4)
    standin = RawHttp(stack.standin.url, 2)
    b_start = time.monotonic() + scenario.b_delay_s

    async def one_b(index: int, text: str) -> tuple[list[Submission], Counter[int]]:
        await asyncio.sleep(max(0.0, b_start + index * scenario.b_interval_s - time.monotonic()))
        return await submit_all(b_http, [text], concurrency=1, deadline=deadline)

    try:
        flood_tasks = [
            asyncio.create_task(
                submit_all(http, texts, concurrency=scenario.submit_concurrency, deadline=deadline)
            )
            for http, (_, texts) in zip(flood_http, floods, strict=True)
        ]
        b_parts = await asyncio.gather(*(one_b(i, t) for i, t in enumerate(b_texts)))
        flooded = [await task for task in flood_tasks]
        b_subs = [s for subs, _ in b_parts for s in subs]
        b_refused = sum(answers[429] for _, answers in b_parts)
        jobs = sum(len(texts) for _, texts in floods) + len(b_texts)
        # Every key's jobs are counted in the stand-in's successes; each key reads its own.
        readers = [*zip(flood_http, (subs for subs, _ in flooded), strict=True), (b_http, b_subs)]
        for http, subs in readers:
            await track_until_finished(
                http, standin, subs, jobs=jobs, submitting=lambda: False, deadline=deadline
            )
    finally:
        for http in (*flood_http, b_http, standin):
            await http.close()
    refused = [answers[429] for _, answers in flooded] + [0]
    return (
        [subs for subs, _ in flooded],
        b_subs,
        (refused[0], b_refused, refused[1] if len(floods) > 1 else 0),
    )
