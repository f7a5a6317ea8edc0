"""Scenario 7, the noisy neighbour: one key's flood beside another key's trickle, mode 1.

Key A (`priority=batch`) submits N jobs at once; `b_delay_s` later key B
(`priority=interactive`) sends one job every `b_interval_s` for `b_duration_s`. The
regions are scenario 1's. Each variant runs on a fresh stack (learned limits and the
fair share's virtual times start from nothing):

- `alone`: B on an idle system, no flood (the baseline of B's latency);
- `fair`: the issue's scenario, A batch, B interactive;
- `same class`: both keys `priority=interactive` (no priority difference: only the
  weighted fair queuing between keys protects B);
- `one key`: B's jobs sent with A's key, the FIFO a dispatcher without per-key shares
  would give (B's job behind the whole backlog).

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


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One way of running the scenario: who floods, and the keys' policy words."""

    key: str
    label: str
    flood: bool = True
    a_policy: str = "priority=batch weight=1"
    b_policy: str = "priority=interactive"
    b_uses_a_key: bool = False


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
)


@dataclass(frozen=True, kw_only=True)
class NeighbourScenario:
    """The flood, the trickle and the regions of one noisy-neighbour run.

    The defaults are the full run; `SMOKE` is the small version of the integration tier.
    """

    jobs: int = 20_000  # A's, submitted at once
    b_delay_s: float = 30.0  # from A's first submission to B's first
    b_duration_s: float = 60.0
    b_interval_s: float = 1.0
    capacity: Capacity = field(default_factory=Capacity)
    submit_concurrency: int = 16  # A's submissions in flight

    @property
    def b_jobs(self) -> int:
        """B's jobs: one per interval for the duration."""
        return round(self.b_duration_s / self.b_interval_s)

    @property
    def max_pending_jobs(self) -> int:
        """MAX_PENDING_JOBS: room for every job of both keys, so none is refused."""
        return self.jobs + self.b_jobs + 1000

    @property
    def flood_s(self) -> float:
        """A's backlog at the regions' limit, in seconds (the least it can take)."""
        return self.jobs / self.capacity.jobs_per_s

    def timeout_s(self) -> float:
        """How long a variant may take before unfinished jobs count as lost."""
        return max(self.b_delay_s + self.b_duration_s, 3 * self.flood_s) + 120

    def construction(self) -> str:
        """The physical facts the figures stand beside, in one paragraph."""
        return (
            f"Regions as in scenario 1: {self.capacity.describe()}. A's {self.jobs:,} jobs "
            f"need at least {self.flood_s:.0f} s at that limit, so A's backlog is there for "
            f"most or all of B's window ({self.b_delay_s:g} s to "
            f"{self.b_delay_s + self.b_duration_s:g} s after A's first submission, one job "
            f"every {self.b_interval_s:g} s, {self.b_jobs} jobs). "
            f"`MAX_PENDING_JOBS={self.max_pending_jobs:,}`, so every job is admitted; A "
            f"submits with {self.submit_concurrency} connections."
        )


SMOKE: Final = NeighbourScenario(
    jobs=2000,
    b_delay_s=1.0,
    b_duration_s=5.0,
    b_interval_s=0.5,
    capacity=Capacity(concurrency=8, latency_s=0.05),
)


@dataclass
class NeighbourRun:
    """The figures of one variant."""

    variant: str
    label: str
    a_jobs: int
    b_jobs: int
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
    limit_per_s: float
    a_submit_s: float  # A's first to last accepted submission
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
    def goodput(self) -> float:
        """Every job per second over the whole run, against the regions' limit."""
        return self.overall_per_s / self.limit_per_s if self.limit_per_s else 0.0

    @property
    def window_goodput(self) -> float:
        """Every job per second while B sends, against the regions' limit."""
        return self.window_per_s / self.limit_per_s if self.limit_per_s else 0.0

    def summary(self) -> dict[str, Any]:
        """Every figure but the chart's series, for the log."""
        doc = asdict(self)
        doc.pop("b_points")
        doc.pop("a_final_at")
        return doc


def variant(key: str) -> Variant:
    """The variant named `key`."""
    return next(v for v in VARIANTS if v.key == key)


@dataclass(frozen=True)
class Keys:
    """The two callers' API keys (the file holds only their hashes)."""

    a: str
    b: str


@contextmanager
def neighbour_stack(
    scenario: NeighbourScenario, chosen: Variant, *, log_dir: Path
) -> Iterator[tuple[BenchStack, Keys]]:
    """A fresh mode-1 stack with the two keys of `chosen` in its API_KEYS_FILE."""
    keys = Keys(a=secrets.token_urlsafe(24), b=secrets.token_urlsafe(24))
    path = log_dir / f"keys-{uuid.uuid4().hex[:8]}"
    path.write_text(
        f"team-a:{_sha256(keys.a)} {chosen.a_policy}\nteam-b:{_sha256(keys.b)} {chosen.b_policy}\n",
        encoding="utf-8",
    )
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
) -> NeighbourRun:
    """Run one variant on a fresh stack from `neighbour_stack`; read the figures.

    Args:
        stack: The stack (its stand-in is reset first).
        keys: The stack's two API keys.
        scenario: The flood, the trickle and the regions.
        chosen: The variant the stack's keys file was written for.
        timeout_s: Give up waiting after this long (default: the scenario's); jobs not
            final by then count as lost.
    """
    run_id = uuid.uuid4().hex[:8]
    a_texts = [f"a-{run_id}-{i}" for i in range(scenario.jobs if chosen.flood else 0)]
    b_texts = [f"b-{run_id}-{i}" for i in range(scenario.b_jobs)]
    with httpx.Client(trust_env=False, timeout=60) as http:
        http.post(f"{stack.standin.url}/_standin/reset").raise_for_status()
        meter = CpuMeter(stack.process_groups())
        started = time.time()
        drive = _drive(
            stack,
            keys.a,
            keys.a if chosen.b_uses_a_key else keys.b,
            a_texts,
            b_texts,
            scenario,
            timeout_s if timeout_s is not None else scenario.timeout_s(),
        )
        a_subs, b_subs, refused = run_async(drive)
        cpu = meter.used()
        calls = http.get(f"{stack.standin.url}/_standin/calls").json()
    a_final = _final(a_subs)
    b_final = _final(b_subs)
    b_done = [(s, v) for s, v in b_final if v["status"] == "succeeded"]
    b_latency = [parse_time(v["updated_at"]) - s.sent_at for s, v in b_done]
    b_record = [parse_time(v["updated_at"]) - parse_time(v["created_at"]) for _, v in b_done]
    a_end = [parse_time(v["updated_at"]) for _, v in a_final]
    every_end = [*a_end, *(parse_time(v["updated_at"]) for _, v in b_final)]
    window_start = started + scenario.b_delay_s
    window_end = window_start + scenario.b_duration_s
    in_window = sum(1 for t in a_end if window_start <= t < window_end)
    # A's rate beside B counts only the part of B's window in which A still had work.
    a_window_s = min(window_end, max(a_end, default=window_start)) - window_start
    every_in_window = sum(1 for t in every_end if window_start <= t < window_end)
    last = max(every_end, default=started)
    a_sent = [s.sent_at for s in a_subs]
    b_prefix = f"b-{run_id}-"
    return NeighbourRun(
        variant=chosen.key,
        label=chosen.label,
        a_jobs=len(a_texts),
        b_jobs=len(b_texts),
        b_latency_p50_s=round(percentile(b_latency, 0.50), 3),
        b_latency_p99_s=round(percentile(b_latency, 0.99), 3),
        b_latency_max_s=round(max(b_latency, default=0.0), 3),
        b_record_p50_s=round(percentile(b_record, 0.50), 3),
        b_record_p99_s=round(percentile(b_record, 0.99), 3),
        b_upstream_429s=sum(
            1 for c in calls if c["status"] == 429 and str(c["text"]).startswith(b_prefix)
        ),
        a_in_window_per_s=round(in_window / a_window_s, 1) if a_window_s > 0 else 0.0,
        a_overall_per_s=round(len(a_end) / (max(a_end) - started), 1) if a_end else 0.0,
        window_per_s=round(every_in_window / scenario.b_duration_s, 1),
        overall_per_s=round(len(every_end) / (last - started), 1) if last > started else 0.0,
        limit_per_s=scenario.capacity.jobs_per_s,
        a_submit_s=round(max(a_sent) - min(a_sent), 1) if a_sent else 0.0,
        refused={"A": refused[0], "B": refused[1]},
        statuses={
            "A": dict(Counter(str(v["status"]) for _, v in a_final)),
            "B": dict(Counter(str(v["status"]) for _, v in b_final)),
        },
        lost={"A": len(a_texts) - len(a_final), "B": len(b_texts) - len(b_final)},
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
    a_key: str,
    b_key: str,
    a_texts: list[str],
    b_texts: list[str],
    scenario: NeighbourScenario,
    timeout_s: float,
) -> tuple[list[Submission], list[Submission], tuple[int, int]]:
    """A's flood and B's trickle at once, then every job read until final."""
    deadline = time.monotonic() + timeout_s
    a_http = RawHttp(
        stack.ingress.url, scenario.submit_concurrency + 16, headers={"X-API-Key": a_key}
    )
    b_http = RawHttp(stack.ingress.url, 4, headers={"X-API-Key": b_key})
    standin = RawHttp(stack.standin.url, 2)
    b_start = time.monotonic() + scenario.b_delay_s

    async def one_b(index: int, text: str) -> tuple[list[Submission], Counter[int]]:
        await asyncio.sleep(max(0.0, b_start + index * scenario.b_interval_s - time.monotonic()))
        return await submit_all(b_http, [text], concurrency=1, deadline=deadline)

    try:
        a_task = asyncio.create_task(
            submit_all(a_http, a_texts, concurrency=scenario.submit_concurrency, deadline=deadline)
        )
        b_parts = await asyncio.gather(*(one_b(i, t) for i, t in enumerate(b_texts)))
        a_subs, a_answers = await a_task
        b_subs = [s for subs, _ in b_parts for s in subs]
        b_refused = sum(answers[429] for _, answers in b_parts)
        jobs = len(a_texts) + len(b_texts)
        # Both keys' jobs are counted in the stand-in's successes; each key reads its own.
        for http, subs in ((a_http, a_subs), (b_http, b_subs)):
            await track_until_finished(
                http, standin, subs, jobs=jobs, submitting=lambda: False, deadline=deadline
            )
    finally:
        await a_http.close()
        await b_http.close()
        await standin.close()
    return a_subs, b_subs, (a_answers[429], b_refused)
