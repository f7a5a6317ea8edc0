"""The ingress's bounded local cache of finished job records.

A finished record never changes again, so it is served from here without a
store read; an unfinished one is always read from the store, so a status is
never stale (modes 2 and 3).
"""

from __future__ import annotations

from collections import OrderedDict

from dispatcher.jobs import Job


class FinishedJobCache:
    """Least-recently-used cache of terminal job records."""

    def __init__(self, max_jobs: int) -> None:
        self._max_jobs = max_jobs
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> Job | None:
        """The cached record, or None."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._jobs.move_to_end(job_id)
        return job

    def remember(self, job: Job) -> None:
        """Keep `job` if it is finished; unfinished records are never cached."""
        if not job.status.is_terminal or self._max_jobs == 0:
            return
        self._jobs[job.job_id] = job
        self._jobs.move_to_end(job.job_id)
        while len(self._jobs) > self._max_jobs:
            self._jobs.popitem(last=False)
