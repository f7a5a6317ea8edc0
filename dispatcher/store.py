"""What a job store does: read and write records, nothing more.

The rules (which status may follow which, leases) live in `lifecycle.py`,
which hands each change to `update()` as a pure function. A store applies it
atomically: the Firestore store by a conditional write (retried on conflict),
the memory store with no await between read and write. So both stores obey the
same rules, tested once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from dispatcher.jobs import Job, JobStatus

Change = Callable[[Job], Job | None]
"""A pure function from the current record to its successor, or None to leave it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class JobQuery:
    """Which of one caller's jobs to list, newest first (`created_at`, then `job_id`).

    Attributes:
        owner: The caller (None: the jobs made with API keys off).
        status: Only jobs in this state.
        since: Only jobs created at or after this time.
        after: The (created_at, job_id) of the previous page's last job.
        limit: At most this many jobs.
    """

    owner: str | None
    status: JobStatus | None = None
    since: datetime | None = None
    after: tuple[datetime, str] | None = None
    limit: int = 100


class JobStore(Protocol):
    """Persistence for job records."""

    async def create(self, job: Job) -> None:
        """Store a new job.

        Raises:
            JobExists: a job with this id is already stored.
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def get(self, job_id: str) -> Job | None:
        """The job, or None when there is none.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs that exist among `job_ids`, by id (one round trip where the store allows).

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def update(self, job_id: str, change: Change) -> Job | None:
        """Apply `change` atomically.

        `change` may run more than once (a write retried after a conflict),
        so it must be pure.

        Returns:
            The record as it stands afterwards (changed or not); None if there is none.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def due(self, now: datetime, limit: int) -> list[Job]:
        """Jobs whose `sweep_at` has passed, oldest first, at most `limit`: unfinished
        ones, and final ones whose completion event is still owed.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """The jobs the query selects, newest first.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def count_by_status(
        self, owner: str | None, since: datetime | None
    ) -> dict[JobStatus, int]:
        """How many of the owner's jobs (created since `since`) are in each state.

        Raises:
            StoreUnavailable: the store could not be reached.
        """
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
