"""The rules of a job's life, in one place, over any store.

Every change is a pure function of the current record (so a Firestore
conflict may re-run it) handed to `JobStore.update`. Leases make execution
idempotent: `pending → running` takes a lease with a fresh token; only the
holder of that token may finish the job, renew or release it; a lease that has
lapsed may be taken over by another execution.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from dispatcher.jobs import Job, JobError, JobStatus, JsonObject, new_job_id
from dispatcher.store import Change, JobStore


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


class ClaimOutcome(enum.Enum):
    """What an execution found when it tried to take a job."""

    CLAIMED = "claimed"  # the lease is ours: call Vertex
    FINISHED = "finished"  # nothing left to do: acknowledge
    BUSY = "busy"  # another execution holds a live lease: try again later
    MISSING = "missing"  # no such record (expired, or never written)


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """The result of `JobManager.claim`."""

    outcome: ClaimOutcome
    job: Job | None
    lease_token: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Lifecycle:
    """Timing and delivery rules for records.

    Attributes:
        lease_s: How long a claim holds a job without renewal.
        job_ttl_s: How long a record lives after creation.
        publish_grace_s: How long a pending job may wait before the sweep re-dispatches it.
        max_delivery_attempts: Deliveries after which a job that still fails
            transiently is failed for good.
        completion_events: Whether a job that becomes final owes a completion event
            (RESULTS_TOPIC): it is then marked `event_pending`, with a sweep time, in the
            same write, so the event is published at least once even if the process
            dies before it publishes (the recovery sweep does it then).
    """

    lease_s: float
    job_ttl_s: float
    publish_grace_s: float
    max_delivery_attempts: int
    completion_events: bool = False

    def out_of_deliveries(self, deliveries: int) -> bool:
        """Whether a job delivered this many times gets no further delivery: the one
        statement of the delivery limit (the executor and the sweep both ask it)."""
        return deliveries >= self.max_delivery_attempts


class JobManager:
    """Applies the lifecycle rules to jobs in a store."""

    def __init__(
        self,
        store: JobStore,
        rules: Lifecycle,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.rules = rules
        self._clock = clock
        self._listeners: list[Callable[[Job], None]] = []

    def now(self) -> datetime:
        """The time by this manager's clock, the one clock every rule reads."""
        return self._clock()

    def on_finished(self, listener: Callable[[Job], None]) -> None:
        """Call `listener` with each job this process brings to a terminal state."""
        self._listeners.append(listener)

    def _announce(self, job: Job | None) -> None:
        if job is not None and job.status.is_terminal:
            for listener in self._listeners:
                listener(job)

    def new_job(
        self,
        *,
        job_id: str | None = None,
        model: str,
        region: str,
        request: JsonObject,
        session_id: str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        trace: str | None = None,
        tier: str = "standard",
        deadline: datetime | None = None,
        fallback: bool = True,
        priority: str = "interactive",
        weight: float = 1.0,
    ) -> Job:
        """A pending job, stamped with its creation, expiry and sweep times (a new id if none)."""
        now = self._clock()
        return Job(
            job_id=job_id or new_job_id(),
            model=model,
            region=region,
            request=request,
            created_at=now,
            updated_at=now,
            expire_at=now + timedelta(seconds=self.rules.job_ttl_s),
            sweep_at=now + timedelta(seconds=self.rules.publish_grace_s),
            session_id=session_id,
            owner=owner,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            trace=trace,
            tier=tier,
            deadline=deadline,
            fallback=fallback,
            priority=priority,
            weight=weight,
        )

    async def get(self, job_id: str) -> Job | None:
        """The job as stored, or None."""
        return await self.store.get(job_id)

    async def _apply(self, job_id: str, change: Change) -> tuple[Job | None, bool]:
        """Run `change` through the store; also say whether it wrote.

        A conflicting write may run the change several times; the verdict kept is the
        one of the run that committed, the last.
        """
        wrote = finished = False

        def tracked(job: Job) -> Job | None:
            nonlocal wrote, finished
            changed = change(job)
            wrote = changed is not None
            # Only the write that makes a job final announces it (not, say, event_sent).
            finished = wrote and not job.status.is_terminal
            return changed

        job = await self.store.update(job_id, tracked)
        wrote = wrote and job is not None
        if wrote and finished:
            self._announce(job)
        return job, wrote

    async def claim(self, job_id: str) -> Claim:
        """Take a job for execution, unless it is finished or leased by another.

        Returns:
            The claim; with `CLAIMED`, the lease token to pass to later calls.
        """
        token = secrets.token_hex(8)
        now = self._clock()
        lease_until = now + timedelta(seconds=self.rules.lease_s)

        def take(job: Job) -> Job | None:
            if job.status.is_terminal:
                return None
            if job.status is JobStatus.RUNNING and job.lease_until and job.lease_until > now:
                return None
            return replace(
                job,
                status=JobStatus.RUNNING,
                lease_owner=token,
                lease_until=lease_until,
                sweep_at=lease_until,
                deliveries=job.deliveries + 1,
                updated_at=now,
            )

        job = await self.store.update(job_id, take)
        if job is None:
            return Claim(outcome=ClaimOutcome.MISSING, job=None)
        if job.status.is_terminal:
            return Claim(outcome=ClaimOutcome.FINISHED, job=job)
        if job.lease_owner == token:
            return Claim(outcome=ClaimOutcome.CLAIMED, job=job, lease_token=token)
        return Claim(outcome=ClaimOutcome.BUSY, job=job)

    async def renew(self, job_id: str, token: str) -> bool:
        """Extend our lease; False when it is no longer ours."""
        now = self._clock()
        lease_until = now + timedelta(seconds=self.rules.lease_s)

        def extend(job: Job) -> Job | None:
            if not _holds(job, token):
                return None
            return replace(job, lease_until=lease_until, sweep_at=lease_until, updated_at=now)

        _, wrote = await self._apply(job_id, extend)
        return wrote

    async def succeed(
        self, job_id: str, token: str, *, result: JsonObject, progress: Progress
    ) -> Job | None:
        """Record the Vertex response; None if the lease was lost meanwhile."""
        return await self._finish(
            job_id, token, progress, status=JobStatus.SUCCEEDED, result=result, error=None
        )

    async def fail(
        self, job_id: str, token: str, *, error: JobError, progress: Progress
    ) -> Job | None:
        """Record a final failure; None if the lease was lost meanwhile."""
        return await self._finish(
            job_id, token, progress, status=JobStatus.FAILED, result=None, error=error
        )

    async def release(
        self, job_id: str, token: str, *, progress: Progress, retry_in_s: float, error: JobError
    ) -> Job | None:
        """Give the job back as pending, to be run again after `retry_in_s`."""
        now = self._clock()

        def give_back(job: Job) -> Job | None:
            if not _holds(job, token):
                return None
            return replace(
                progress.apply(job),
                status=JobStatus.PENDING,
                lease_owner=None,
                lease_until=None,
                error=error,
                sweep_at=now + timedelta(seconds=retry_in_s + self.rules.publish_grace_s),
                updated_at=now,
            )

        job, wrote = await self._apply(job_id, give_back)
        return job if wrote else None

    async def fail_pending(self, job_id: str, error: JobError) -> Job | None:
        """Fail a job that never started (its dispatch failed); None if it had moved on."""
        now = self._clock()

        def abandon(job: Job) -> Job | None:
            if job.status is not JobStatus.PENDING:
                return None
            return _terminal(job, JobStatus.FAILED, now, result=None, error=error, rules=self.rules)

        job, wrote = await self._apply(job_id, abandon)
        return job if wrote else None

    async def cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Cancel a job that has not started.

        Returns:
            The job as it now stands (None if there is none), and whether this call
            cancelled it (False: it had started or finished already).
        """
        now = self._clock()

        def stop(job: Job) -> Job | None:
            if job.status is not JobStatus.PENDING:
                return None
            return _terminal(
                job, JobStatus.CANCELLED, now, result=None, error=None, rules=self.rules
            )

        return await self._apply(job_id, stop)

    async def fail_unleased(self, job_id: str, error: JobError) -> Job | None:
        """Fail a job that is pending or whose lease has lapsed (give-up in the sweep)."""
        now = self._clock()

        def abandon(job: Job) -> Job | None:
            if job.status.is_terminal:
                return None
            if job.status is JobStatus.RUNNING and job.lease_until and job.lease_until > now:
                return None
            return _terminal(job, JobStatus.FAILED, now, result=None, error=error, rules=self.rules)

        job, wrote = await self._apply(job_id, abandon)
        return job if wrote else None

    async def postpone_sweep(self, job_id: str, seen_sweep_at: datetime) -> bool:
        """Move a due job's sweep time on; True for the one sweeper that did it.

        Several processes sweep the same store; the one whose conditional write finds the
        `sweep_at` it saw still in place re-dispatches the job, the others skip it.
        """
        now = self._clock()
        next_sweep = now + timedelta(seconds=self.rules.publish_grace_s)

        def bump(job: Job) -> Job | None:
            owed = job.status.is_terminal and job.event_pending  # its event, not the job
            if (job.status.is_terminal and not owed) or job.sweep_at != seen_sweep_at:
                return None
            return replace(job, sweep_at=next_sweep)

        _, wrote = await self._apply(job_id, bump)
        return wrote

    async def event_sent(self, job_id: str) -> None:
        """Record that the job's completion event was published (idempotent)."""

        def sent(job: Job) -> Job | None:
            if not job.event_pending:
                return None
            return replace(job, event_pending=False, sweep_at=None)

        await self._apply(job_id, sent)

    async def due(self, limit: int) -> list[Job]:
        """Unfinished jobs whose sweep time has passed."""
        return await self.store.due(self._clock(), limit)

    async def _finish(
        self,
        job_id: str,
        token: str,
        progress: Progress,
        *,
        status: JobStatus,
        result: JsonObject | None,
        error: JobError | None,
    ) -> Job | None:
        now = self._clock()

        def finish(job: Job) -> Job | None:
            if not _holds(job, token):
                return None
            return _terminal(
                progress.apply(job), status, now, result=result, error=error, rules=self.rules
            )

        job, wrote = await self._apply(job_id, finish)
        return job if wrote else None


@dataclass(frozen=True, kw_only=True, slots=True)
class Progress:
    """What one execution adds to a job's record: calls made and where."""

    calls: int = 0
    regions: tuple[str, ...] = ()
    served_by: str | None = None
    tiers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    usage: JsonObject | None = None

    def apply(self, job: Job) -> Job:
        """The job with this execution's calls counted."""
        return replace(
            job,
            attempts=job.attempts + self.calls,
            regions_tried=job.regions_tried + self.regions,
            region=self.served_by or job.region,
            tiers_tried=job.tiers_tried + self.tiers,
            models_tried=job.models_tried + self.models,
            usage=self.usage or job.usage,
        )


def _holds(job: Job, token: str) -> bool:
    return job.status is JobStatus.RUNNING and job.lease_owner == token


def _terminal(
    job: Job,
    status: JobStatus,
    now: datetime,
    *,
    result: JsonObject | None,
    error: JobError | None,
    rules: Lifecycle,
) -> Job:
    events = rules.completion_events
    return replace(
        job,
        status=status,
        result=result,
        error=error,
        lease_owner=None,
        lease_until=None,
        # With completion events, the sweep looks again if the event is not sent by then.
        sweep_at=now + timedelta(seconds=rules.publish_grace_s) if events else None,
        event_pending=events,
        updated_at=now,
    )
