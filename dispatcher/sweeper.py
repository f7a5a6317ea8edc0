"""The recovery sweep: no job is stranded.

A job whose `sweep_at` has passed was not moved on by anyone: its publish was
lost (the ingress died between writing and publishing, or Pub/Sub refused), or
its executor died holding the lease. Every process with a shared store sweeps
now and then; a conditional write (`postpone_sweep`) lets exactly one of them
re-dispatch each such job. A job that has used up its deliveries is failed with
its last error instead. A final job whose completion event is still owed
(`events.py`) gets its event published.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from dispatcher.background import BackgroundLoop
from dispatcher.events import CompletionEvents
from dispatcher.jobs import Job, JobError
from dispatcher.lifecycle import JobManager

log = logging.getLogger(__name__)


class Redispatcher(Protocol):
    """Something that can send a job to be executed again."""

    async def redispatch(self, job: Job) -> None:
        """Send the job again."""
        ...


class Sweeper:
    """Re-dispatches or fails jobs that nobody is moving on."""

    def __init__(
        self,
        manager: JobManager,
        queue: Redispatcher,
        *,
        interval_s: float,
        batch: int = 200,
        events: CompletionEvents | None = None,
    ) -> None:
        self._manager = manager
        self._queue = queue
        self._events = events
        self._interval_s = interval_s
        self._batch = batch
        self._sweeps = BackgroundLoop("sweeper", self._loop)

    async def sweep_once(self) -> int:
        """One pass; returns how many jobs it acted on."""
        acted = 0
        for job in await self._manager.due(self._batch):
            assert job.sweep_at is not None
            if job.status.is_terminal:  # final, its completion event still owed
                if (
                    self._events is not None
                    and await self._manager.postpone_sweep(job.job_id, job.sweep_at)
                    and await self._events.send(job)
                ):
                    acted += 1
                continue
            if self._manager.rules.out_of_deliveries(job.deliveries):
                last = job.error or JobError(
                    code=503, status="UNAVAILABLE", message="executor lost while running"
                )
                error = JobError(
                    code=last.code,
                    status=last.status,
                    message=f"gave up after {job.deliveries} deliveries: {last.message}",
                )
                if await self._manager.fail_unleased(job.job_id, error):
                    acted += 1
                continue
            if await self._manager.postpone_sweep(job.job_id, job.sweep_at):
                log.warning(
                    "re-dispatching a stranded job",
                    extra={"job_id": job.job_id, "status": job.status.value},
                )
                await self._queue.redispatch(job)
                acted += 1
        return acted

    def start(self) -> None:
        """Sweep every `interval_s` in the background."""
        self._sweeps.start()

    async def stop(self) -> None:
        """Stop sweeping."""
        await self._sweeps.stop()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep_once()
            except Exception:
                log.exception("sweep failed; will try again")
