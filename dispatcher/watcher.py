"""Waiting for jobs to finish without every waiting request polling the store.

Long-poll requests (`GET /jobs/{id}?wait=S`) and the synchronous Vertex-compatible
route register here. Jobs this process finishes wake their waiters at once (the
job manager announces them); for jobs finished elsewhere (the worker in mode 3,
another instance in mode 2) one background task reads all waited-for jobs in a
single batched store request every `interval_s`, however many requests wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from dispatcher.background import BackgroundLoop
from dispatcher.errors import StoreUnavailable
from dispatcher.jobs import Job
from dispatcher.lifecycle import JobManager

log = logging.getLogger(__name__)


class JobWatcher:
    """Wakes waiters when their job reaches a terminal state."""

    def __init__(self, manager: JobManager, *, interval_s: float) -> None:
        self._manager = manager
        self._interval_s = interval_s
        self._waiters: defaultdict[str, set[asyncio.Future[Job]]] = defaultdict(set)
        self._wake = asyncio.Event()
        self._poller = BackgroundLoop("job-watcher", self._poll)
        manager.on_finished(self._finished)

    @property
    def waiting(self) -> int:
        """Jobs with at least one waiter."""
        return len(self._waiters)

    async def wait(self, job_id: str, timeout_s: float) -> Job | None:
        """The job once terminal, or None if `timeout_s` passes first."""
        future: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters[job_id].add(future)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[job_id]

    def start(self) -> None:
        """Begin the batched polling for jobs finished elsewhere."""
        self._poller.start()

    async def stop(self) -> None:
        """Stop polling."""
        await self._poller.stop()

    def _finished(self, job: Job) -> None:
        for future in self._waiters.get(job.job_id, ()):
            if not future.done():
                future.set_result(job)

    async def _poll(self) -> None:
        while True:
            if not self._waiters:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self._interval_s)
            job_ids = list(self._waiters)
            if not job_ids:
                continue
            try:
                found = await self._manager.store.get_many(job_ids)
            except StoreUnavailable:
                log.warning("watcher could not read jobs; will retry")
                continue
            for job in found.values():
                if job.status.is_terminal:
                    self._finished(job)
