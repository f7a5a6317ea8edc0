"""Handing jobs to executors: the protocol, and the in-process queue of modes 1 and 2.

In mode 3 the queue is Pub/Sub (`pubsub.py`). In modes 1 and 2 the ingress runs
jobs itself, one task per job under way. How many are under way follows the
regions, not a constant: a job is started while fewer than a few runs are without a
region slot (claiming the job, waiting for a slot, backing off, recording the
result), so the calls in flight track the sum of the regions' adaptive limits as
they grow and shrink, and jobs beyond that wait here, costing a queue entry each
rather than a task and a lease. Admission is bounded too: past
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
from dispatcher.fairness import FairQueue, Share, share_of
from dispatcher.jobs import Job
from dispatcher.regions import RegionPool

log = logging.getLogger(__name__)

# Runs without a slot allowed at once: this share of the regions' capacity, at least
# the floor. A run needs a few ms (mode 1) to tens of ms (Firestore) before its call
# and after it; this many ready keep every slot fed without holding leases early.
SPARE_RUNS_SHARE = 8
SPARE_RUNS_MIN = 8
# The pump looks again at least this often: a slot taken by a waiting run makes room
# without a run ending.
PUMP_RECHECK_S = 0.05


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
    """An asyncio queue of job ids, started as the regions' free capacity allows."""

    def __init__(
        self,
        executor: JobExecutor,
        *,
        pool: RegionPool,
        regions: tuple[str, ...],
        max_pending: int,
        max_runs: int | None = None,
    ) -> None:
        """Args:
        executor: Runs one job.
        pool: The regions' health and limits, shared with the executor's Vertex client.
        regions: Every region any configured model may use.
        max_pending: Unfinished jobs admitted at most.
        max_runs: An optional hard cap on runs under way (None: the regions decide).
        """
        self._executor = executor
        self._pool = pool
        self._regions = regions
        self._max_pending = max_pending
        self._max_runs = max_runs
        # Queued jobs start in fair order between callers (interactive first), not FIFO.
        self._queue = FairQueue()
        self._admitted = 0
        self._runs: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def unfinished(self) -> int:
        """Jobs admitted and not yet finished."""
        return self._admitted

    @property
    def queued(self) -> int:
        """Jobs waiting to be started."""
        return self._queue.qsize()

    @property
    def runs(self) -> int:
        """Jobs under way."""
        return len(self._runs)

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
        self._queue.put_nowait(job.job_id, share_of(job))

    async def redispatch(self, job: Job) -> None:
        """Queue a job found by the recovery sweep (not admitted through the ingress)."""
        self._admitted += 1
        self._queue.put_nowait(job.job_id, share_of(job))

    async def start(self) -> None:
        """Start the pump that turns queued ids into runs."""
        self._pump_task = asyncio.create_task(self._pump(), name="executor-pump")

    async def close(self) -> None:
        """Stop starting runs and cancel those under way; each releases its job."""
        for timer in self._timers:
            timer.cancel()
        tasks = [*self._runs, *([self._pump_task] if self._pump_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._runs.clear()
        self._pump_task = None

    def has_room(self) -> bool:
        """Whether another run may start now."""
        if self._max_runs is not None and len(self._runs) >= self._max_runs:
            return False
        without_slot = len(self._runs) - self._pool.in_flight
        spare = max(SPARE_RUNS_MIN, self._pool.capacity(self._regions) // SPARE_RUNS_SHARE)
        return without_slot < spare

    async def _pump(self) -> None:
        while True:
            job_id, share = await self._queue.get()
            while not self.has_room():
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), PUMP_RECHECK_S)
            task = asyncio.create_task(self._run(job_id, share))
            self._runs.add(task)
            task.add_done_callback(self._run_ended)

    def _run_ended(self, task: asyncio.Task[None]) -> None:
        self._runs.discard(task)
        self._room.set()

    async def _run(self, job_id: str, share: Share) -> None:
        requeued = False
        try:
            outcome = await self._executor.run(job_id)
            if outcome.result is RunResult.RETRY:
                self._requeue_later(job_id, share, outcome.retry_after_s)
                requeued = True
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store was unreachable, or something unforeseen: keep the job.
            log.exception("run failed; requeueing", extra={"job_id": job_id})
            self._requeue_later(job_id, share, 1.0)
            requeued = True
        finally:
            if not requeued:
                self._admitted = max(0, self._admitted - 1)

    def _requeue_later(self, job_id: str, share: Share, delay_s: float) -> None:
        loop = asyncio.get_running_loop()

        def put_back() -> None:
            self._timers.discard(timer)
            self._queue.put_nowait(job_id, share)

        timer = loop.call_later(delay_s, put_back)
        self._timers.add(timer)
