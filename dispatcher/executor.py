"""Job execution: the same code behind the in-process runner and the push worker.

One run claims the job (a lease), calls Vertex with retries across regions,
renews the lease while the call lasts, and records the outcome. It answers
`DONE` when nothing remains to do (succeeded, failed for good, already finished
elsewhere) and `RETRY` when a later run should try again (transient failures
with deliveries left, or another execution holding a live lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dispatcher.errors import CorruptRecord, InvalidRequest
from dispatcher.fairness import share_of
from dispatcher.jobs import Job, JobError, JsonObject
from dispatcher.lifecycle import ClaimOutcome, JobManager, Progress
from dispatcher.logs import job_context
from dispatcher.metrics import COST, JOBS, TOKENS
from dispatcher.pricing import RATE_OF_TRAFFIC, PriceTable
from dispatcher.regions import pinned_region
from dispatcher.settings import ModelConfig, Tier
from dispatcher.tiers import (
    GLOBAL,
    LatencyBook,
    auto_tier,
    check_tier,
    lane_parts,
    regions_for,
    standard_reserve_s,
)
from dispatcher.vertex import CallReport, VertexClient

log = logging.getLogger(__name__)


class RunResult(enum.Enum):
    """What the caller of `run` should do with the delivery."""

    DONE = "done"  # acknowledge
    RETRY = "retry"  # run again later (nack / requeue)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunOutcome:
    """The result of one run."""

    result: RunResult
    retry_after_s: float = 0.0
    job: Job | None = None


class JobExecutor:
    """Runs jobs to their end, idempotently."""

    def __init__(
        self,
        manager: JobManager,
        vertex: VertexClient,
        models: Mapping[str, ModelConfig],
        *,
        requeue_delay_s: float,
        prices: PriceTable | None = None,
    ) -> None:
        self._manager = manager
        self._vertex = vertex
        self._models = models
        self._requeue_delay_s = requeue_delay_s
        self._active: set[asyncio.Task[Any]] = set()
        self._latency = LatencyBook()
        self._prices = prices

    @property
    def running(self) -> int:
        """Runs in flight in this process."""
        return len(self._active)

    async def wait_idle(self, timeout_s: float) -> None:
        """Wait until no run is in flight (cancelled runs release their job first)."""
        if self._active:
            await asyncio.wait(set(self._active), timeout=timeout_s)

    async def run(self, job_id: str, *, delivery_attempt: int | None = None) -> RunOutcome:
        """Execute one job once.

        Args:
            job_id: The job.
            delivery_attempt: Pub/Sub's count of deliveries, when it sends one.

        Raises:
            StoreUnavailable: the record could not be read or written; retry later.
        """
        try:
            claim = await self._manager.claim(job_id)
        except CorruptRecord as exc:
            # Redelivering a record that can never be read would loop for ever: the
            # delivery is done, and the log (and the metric) say why.
            log.error(
                "corrupt job record; not running it", extra={"job_id": job_id, "reason": str(exc)}
            )
            JOBS.labels("corrupt").inc()
            return RunOutcome(result=RunResult.DONE)
        if claim.outcome is ClaimOutcome.MISSING:
            log.warning("job not found; dropping the delivery", extra={"job_id": job_id})
            return RunOutcome(result=RunResult.DONE)
        if claim.outcome is ClaimOutcome.FINISHED:
            log.info("job already finished; not calling Vertex", extra={"job_id": job_id})
            return RunOutcome(result=RunResult.DONE, job=claim.job)
        job = claim.job
        assert job is not None
        if claim.outcome is ClaimOutcome.BUSY:
            now = self._manager.now()
            lease_left = (job.lease_until or now) - now
            return RunOutcome(
                result=RunResult.RETRY, retry_after_s=max(1.0, lease_left.total_seconds()), job=job
            )
        assert claim.lease_token is not None
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            with job_context(job.job_id, job.trace):
                return await self._execute(job, claim.lease_token, delivery_attempt)
        finally:
            self._active.discard(task)

    async def _execute(self, job: Job, token: str, delivery_attempt: int | None) -> RunOutcome:
        model = self._models.get(job.model)
        if model is None:
            error = JobError(
                code=400,
                status="FAILED_PRECONDITION",
                message=f"model {job.model!r} is no longer configured in MODEL_CONFIG",
            )
            finished = await self._manager.fail(job.job_id, token, error=error, progress=Progress())
            return RunOutcome(result=RunResult.DONE, job=finished)
        if job.deadline is not None and self._manager.now() >= job.deadline:
            finished = await self._manager.fail(
                job.job_id, token, error=_deadline_passed(job), progress=Progress()
            )
            log.warning("job deadline passed", extra={"job_id": job.job_id})
            return RunOutcome(result=RunResult.DONE, job=finished)
        tried: list[str] = []
        models: list[str] = []
        try:
            async with self._lease_kept(job.job_id, token):
                report = await self._call_with_fallbacks(job, model, tried, models)
        except asyncio.CancelledError:
            # Shutting down: hand the job back at once so another run takes it.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._manager.release(
                        job.job_id,
                        token,
                        progress=_progress(tried, models, usage=None),
                        retry_in_s=0.0,
                        error=_interrupted(),
                    )
                )
            raise
        # The call's slot went to the oldest call waiting for one; let that call go out
        # before this run's bookkeeping. Calls that started together end together, and
        # without this yield a whole wave's records were written before any of the
        # next wave's calls was sent, leaving the freed slots idle meanwhile.
        await asyncio.sleep(0)
        # The region that gave the final answer (served or refused) becomes the job's
        # region; a job given back for a retry keeps its assigned one.
        usage = report.response.get("usageMetadata") if report.response is not None else None
        progress = _progress(
            report.regions, models, usage=usage if isinstance(usage, dict) else None
        )
        if report.response is not None:
            _count_tokens(job, progress, self._prices)
            finished = await self._manager.succeed(
                job.job_id, token, result=report.response, progress=progress
            )
            log.info(
                "job succeeded",
                extra={"job_id": job.job_id, "region": progress.served_by, "calls": report.calls},
            )
            return RunOutcome(result=RunResult.DONE, job=finished)
        assert report.error is not None
        error = report.error.error
        deliveries = max(job.deliveries, delivery_attempt or 0)
        if not report.error.transient or self._manager.rules.out_of_deliveries(deliveries):
            finished = await self._manager.fail(job.job_id, token, error=error, progress=progress)
            log.warning(
                "job failed",
                extra={
                    "job_id": job.job_id,
                    "code": error.code,
                    "status": error.status,
                    "error_message": error.message,
                    "deliveries": deliveries,
                },
            )
            return RunOutcome(result=RunResult.DONE, job=finished)
        released = await self._manager.release(
            job.job_id,
            token,
            progress=replace(progress, served_by=None),
            retry_in_s=self._requeue_delay_s,
            error=error,
        )
        log.info(
            "transient failure; job will be retried",
            extra={"job_id": job.job_id, "code": error.code, "deliveries": deliveries},
        )
        return RunOutcome(result=RunResult.RETRY, retry_after_s=self._requeue_delay_s, job=released)

    async def _call_with_fallbacks(
        self, job: Job, model: ModelConfig, tried: list[str], models: list[str]
    ) -> CallReport:
        """The call in the job's model, then in each of its fallbacks in turn while the
        failure is transient (never after a 4xx) and the deadline allows.

        `models` receives the model of each lane in `tried`.
        """
        chain = [model]
        if job.fallback:
            chain += [
                fallback
                for name in model.fallbacks
                if (fallback := self._models.get(name)) is not None and _runs(fallback, job)
            ]
        for candidate in chain:
            before = len(tried)
            report = await self._call(job, candidate, tried)
            models.extend([candidate.model_id] * (len(tried) - before))
            done = report.error is None or not report.error.transient
            time_left = self._time_left(job)
            if done or (time_left is not None and time_left <= 0):
                break
            if candidate is not chain[-1]:
                log.warning(
                    "model exhausted; falling back",
                    extra={"job_id": job.job_id, "model": candidate.model_id},
                )
        return report

    async def _call(self, job: Job, model: ModelConfig, tried: list[str]) -> CallReport:
        """The job's Vertex call in its tier; `auto` tries flex while the deadline allows."""
        pinned = pinned_region(job.request)
        tier = Tier(job.tier)
        if tier is Tier.AUTO:
            standard_s = self._latency.p95(model.model_id, Tier.STANDARD)
            time_left = self._time_left(job)
            flex_throttles = job.tiers_tried.count(Tier.FLEX.value)
            chosen = auto_tier(
                time_left_s=time_left, standard_p95_s=standard_s, flex_throttles=flex_throttles
            )
            if chosen is Tier.FLEX:
                report = await self._vertex.generate(
                    model=model.model_id,
                    request=job.request,
                    regions=(GLOBAL,),
                    preferred=GLOBAL,
                    tried=tried,
                    share=share_of(job),
                    tier=Tier.FLEX,
                    # Leave the standard reserve before the deadline.
                    budget_s=None
                    if time_left is None
                    else time_left - standard_reserve_s(standard_s),
                )
                if report.response is not None or report.error is None:
                    return report
                if not report.error.transient:
                    return report
            tier = Tier.STANDARD
        preferred = job.region
        # PT regions first: start in one of them (spread by job id), not in the
        # round-robin region assigned over all of the model's regions.
        if (
            tier is Tier.STANDARD
            and model.provisioned_regions
            and not pinned
            and preferred not in model.provisioned_regions
        ):
            spread = sum(job.job_id.encode()) % len(model.provisioned_regions)
            preferred = model.provisioned_regions[spread]
        started = time.monotonic()
        report = await self._vertex.generate(
            model=model.model_id,
            request=job.request,
            regions=(pinned,) if pinned else regions_for(model, tier),
            preferred=pinned or preferred,
            tried=tried,
            share=share_of(job),
            tier=tier,
            budget_s=self._time_left(job),
        )
        if report.response is not None and tier is Tier.STANDARD:
            self._latency.record(model.model_id, tier, time.monotonic() - started)
        return report

    def _time_left(self, job: Job) -> float | None:
        if job.deadline is None:
            return None
        return (job.deadline - self._manager.now()).total_seconds()

    @contextlib.asynccontextmanager
    async def _lease_kept(self, job_id: str, token: str) -> AsyncIterator[None]:
        """Renew the lease every third of its length while the body runs."""
        keeper = _LeaseKeeper(self._manager, job_id, token)
        try:
            yield
        finally:
            await keeper.stop()


class _LeaseKeeper:
    """Renews one lease on a timer until stopped.

    A timer, not a task per run: most calls end before the first renewal is due, and
    a task made and cancelled for each run was a measurable share of a job's CPU in
    mode 1. A class rather than two closures calling each other, which formed a
    reference cycle per run for the garbage collector; `stop` leaves none.
    """

    def __init__(self, manager: JobManager, job_id: str, token: str) -> None:
        self._manager = manager
        self._job_id = job_id
        self._token = token
        self._interval = manager.rules.lease_s / 3
        self._loop = asyncio.get_running_loop()
        self._renewal: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(self._interval, self._start_renewal)

    def _start_renewal(self) -> None:
        self._renewal = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            if not await self._manager.renew(self._job_id, self._token):
                log.warning("lease lost while running", extra={"job_id": self._job_id})
                return
        except Exception:
            log.exception("lease renewal failed", extra={"job_id": self._job_id})
        self._timer = self._loop.call_later(self._interval, self._start_renewal)

    async def stop(self) -> None:
        """Stop renewing; wait for a renewal in flight to be cancelled."""
        self._timer.cancel()
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal


def _runs(model: ModelConfig, job: Job) -> bool:
    """Whether a fallback model can run the job in its tier (and its cache, if pinned)."""
    try:
        check_tier(model, Tier(job.tier))
    except InvalidRequest:
        return False
    pinned = pinned_region(job.request)
    return pinned is None or pinned in model.regions


def _progress(lanes: Sequence[str], models: Sequence[str], *, usage: JsonObject | None) -> Progress:
    """What a run's calls add to the record: regions, tiers and models tried, the usage."""
    parts = [lane_parts(key) for key in lanes]
    return Progress(
        calls=len(parts),
        models=tuple(models),
        regions=tuple(region for region, _ in parts),
        tiers=tuple(tier.value for _, tier in parts),
        # The region that gave the final answer (served or refused) becomes the job's
        # region; a job given back for a retry keeps its assigned one (the caller's
        # `replace(served_by=None)`).
        served_by=parts[-1][0] if parts else None,
        usage=usage,
    )


def _count_tokens(job: Job, progress: Progress, prices: PriceTable | None) -> None:
    usage = progress.usage or {}
    model = progress.models[-1] if progress.models else job.model
    cost = prices.cost_usd(model, usage) if prices is not None else None
    if cost is not None:
        rate = RATE_OF_TRAFFIC.get(str(usage.get("trafficType")), "unknown")
        COST.labels(model, rate, job.owner or "").inc(cost)
    tier = progress.tiers[-1] if progress.tiers else job.tier
    labels = (model, progress.served_by or job.region, tier)
    traffic = str(usage.get("trafficType") or "UNSPECIFIED")
    for kind, field in _TOKEN_FIELDS:
        count = usage.get(field)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            TOKENS.labels(*labels, traffic, job.owner or "", kind).inc(count)


_TOKEN_FIELDS = (
    ("prompt", "promptTokenCount"),
    ("candidates", "candidatesTokenCount"),
    ("cached", "cachedContentTokenCount"),
    ("thoughts", "thoughtsTokenCount"),
    ("total", "totalTokenCount"),
)


def _deadline_passed(job: Job) -> JobError:
    tried = ", ".join(sorted(set(job.tiers_tried))) or "none"
    return JobError(
        code=504,
        status="DEADLINE_EXCEEDED",
        message=f"the job's deadline passed before it was answered (tiers tried: {tried})",
    )


def _interrupted() -> JobError:
    return JobError(code=503, status="UNAVAILABLE", message="execution interrupted by shutdown")
