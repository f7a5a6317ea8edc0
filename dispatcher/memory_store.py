"""A real job store in process memory, bounded in count and age.

Used in single-instance mode and as the twin of the Firestore store in the
shared behaviour suite. Unfinished jobs are never evicted (the ingress bounds
how many may exist); finished ones go oldest-first once the store holds more
than `max_jobs` or once their `expire_at` has passed.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from dispatcher.errors import JobExists
from dispatcher.jobs import Job, JobStatus
from dispatcher.store import Change, JobQuery


def _utc_now() -> datetime:
    return datetime.now(UTC)


class MemoryJobStore:
    """Jobs in a dict; changes applied without an await between read and write."""

    def __init__(self, *, max_jobs: int, clock: Callable[[], datetime] = _utc_now) -> None:
        self._max_jobs = max_jobs
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        # Finished jobs in the order they finished: eviction candidates, oldest first.
        self._finished: OrderedDict[str, datetime] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    async def create(self, job: Job) -> None:
        """Store a new job, evicting finished ones past the bounds."""
        if job.job_id in self._jobs:
            raise JobExists(f"job {job.job_id} already exists")
        self._evict(incoming=1)
        self._jobs[job.job_id] = job
        if job.status.is_terminal:
            self._finished[job.job_id] = job.expire_at

    async def get(self, job_id: str) -> Job | None:
        """The job, or None (also once it has expired)."""
        job = self._jobs.get(job_id)
        if job is not None and job.status.is_terminal and job.expire_at <= self._clock():
            self._forget(job_id)
            return None
        return job

    async def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """The stored jobs among `job_ids`."""
        found = {job_id: await self.get(job_id) for job_id in job_ids}
        return {job_id: job for job_id, job in found.items() if job is not None}

    async def update(self, job_id: str, change: Change) -> Job | None:
        """Apply `change`; atomic because nothing here awaits."""
        current = self._jobs.get(job_id)
        if current is None:
            return None
        changed = change(current)
        if changed is None:
            return current
        self._jobs[job_id] = changed
        if changed.status.is_terminal and job_id not in self._finished:
            self._finished[job_id] = changed.expire_at
        return changed

    async def due(self, now: datetime, limit: int) -> list[Job]:
        """Jobs whose sweep time has passed (unfinished, or final with an event owed),
        oldest sweep time first."""
        due = [
            job
            for job in self._jobs.values()
            if job.sweep_at is not None
            and job.sweep_at <= now
            and (not job.status.is_terminal or job.event_pending)
        ]
        due.sort(key=lambda job: job.sweep_at or now)
        return due[:limit]

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """The jobs the query selects, newest first (a scan: the store is bounded)."""
        selected = sorted(
            (job for job in self._jobs.values() if _selected(job, query)),
            key=_newest_first,
            reverse=True,
        )
        return selected[: query.limit]

    async def count_by_status(
        self, owner: str | None, since: datetime | None
    ) -> dict[JobStatus, int]:
        """How many of the owner's jobs are in each state."""
        counts = Counter(
            job.status
            for job in self._jobs.values()
            if job.owner == owner and (since is None or job.created_at >= since)
        )
        return {status: counts.get(status, 0) for status in JobStatus}

    async def close(self) -> None:
        """Nothing to release."""

    def _evict(self, *, incoming: int) -> None:
        now = self._clock()
        while self._finished:
            oldest_id, expire_at = next(iter(self._finished.items()))
            if len(self._jobs) + incoming <= self._max_jobs and expire_at > now:
                break
            self._forget(oldest_id)

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._finished.pop(job_id, None)


def _newest_first(job: Job) -> tuple[datetime, str]:
    return job.created_at, job.job_id


def _selected(job: Job, query: JobQuery) -> bool:
    return (
        job.owner == query.owner
        and (query.status is None or job.status is query.status)
        and (query.since is None or job.created_at >= query.since)
        and (query.after is None or _newest_first(job) < query.after)
    )
