"""Handing jobs to executors: the protocol, and the in-process queue of modes 1 and 2.

In mode 3 the queue is Pub/Sub (`pubsub.py`). In modes 1 and 2 the ingress runs
jobs itself on a bounded pool of tasks. Admission is bounded too: past
`max_pending` unfinished jobs a submission is refused with `Overloaded` (the
ingress answers 429 with Retry-After) instead of growing memory without limit.
A run that asks for a retry is put back on the queue after its delay, so modes
1 and 2 keep the same guarantees as Pub/Sub redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Protocol

from dispatcher.errors import Overloaded
from dispatcher.executor import JobExecutor, RunResult
from dispatcher.jobs import Job

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    """Where the ingress sends a stored job to be executed."""

    def admit(self) -> None:
        """Reserve room for one more job.

        Raises:
            Overloaded: too much work is waiting.
        """
        ...

    def cancel_admission(self) -> None:
        """Give back a reservation whose job was never dispatched."""
        ...

    async def dispatch(self, job: Job) -> None:
        """Hand the job over.

        Raises:
            PublishFailed: it could not be handed over.
        """
        ...

    async def start(self) -> None:
        """Begin work."""
        ...

    async def close(self) -> None:
        """Stop taking work and let go of what is held."""
        ...


class InProcessQueue:
    """A bounded asyncio queue drained by `concurrency` tasks running the executor."""

    def __init__(
        self,
        executor: JobExecutor,
        *,
        concurrency: int,
        max_pending: int,
    ) -> None:
        self._executor = executor
        self._concurrency = concurrency
        self._max_pending = max_pending
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._admitted = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def unfinished(self) -> int:
        """Jobs admitted and not yet finished."""
        return self._admitted

    @property
    def queued(self) -> int:
        """Jobs waiting for a task."""
        return self._queue.qsize()

    def admit(self) -> None:
        """Reserve room for one job, or refuse with a Retry-After hint."""
        if self._admitted >= self._max_pending:
            raise Overloaded(retry_after_s=max(1, math.ceil(self._queue.qsize() / 100)))
        self._admitted += 1

    def cancel_admission(self) -> None:
        """Give back a reservation."""
        self._admitted = max(0, self._admitted - 1)

    async def dispatch(self, job: Job) -> None:
        """Queue an admitted job."""
        self._queue.put_nowait(job.job_id)

    async def redispatch(self, job: Job) -> None:
        """Queue a job found by the recovery sweep (not admitted through the ingress)."""
        self._admitted += 1
        self._queue.put_nowait(job.job_id)

    async def start(self) -> None:
        """Start the worker tasks."""
        self._tasks = [
            asyncio.create_task(self._drain(), name=f"executor-{i}")
            for i in range(self._concurrency)
        ]

    async def close(self) -> None:
        """Cancel the tasks; a job being run is released by the executor for another run."""
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _drain(self) -> None:
        while True:
            job_id = await self._queue.get()
            requeued = False
            try:
                outcome = await self._executor.run(job_id)
                if outcome.result is RunResult.RETRY:
                    self._requeue_later(job_id, outcome.retry_after_s)
                    requeued = True
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store was unreachable, or something unforeseen: keep the job.
                log.exception("run failed; requeueing", extra={"job_id": job_id})
                self._requeue_later(job_id, 1.0)
                requeued = True
            finally:
                if not requeued:
                    self._admitted = max(0, self._admitted - 1)

    def _requeue_later(self, job_id: str, delay_s: float) -> None:
        loop = asyncio.get_running_loop()

        def put_back() -> None:
            self._timers.discard(timer)
            self._queue.put_nowait(job_id)

        timer = loop.call_later(delay_s, put_back)
        self._timers.add(timer)
