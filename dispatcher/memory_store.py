"""A real job store in process memory, bounded in count and age.

Used in single-instance mode and as the twin of the Firestore store in the
shared behaviour suite. Unfinished jobs are never evicted (the ingress bounds
how many may exist); finished ones go oldest-first once the store holds more
than `max_jobs` or once their `expire_at` has passed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from dispatcher.errors import JobExists
from dispatcher.jobs import Job
from dispatcher.store import Change


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
        """Unfinished jobs whose sweep time has passed, oldest sweep time first."""
        due = [
            job
            for job in self._jobs.values()
            if job.sweep_at is not None and job.sweep_at <= now and not job.status.is_terminal
        ]
        due.sort(key=lambda job: job.sweep_at or now)
        return due[:limit]

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
