"""Fair share between callers: interactive before batch, weighted fair queuing within a class.

Used twice on the way to Vertex: by the in-process queue (which queued job starts next)
and by the region pool (which waiting call gets a freed slot). Each slot (or start) a
caller gets advances its virtual time by 1/weight; the waiting caller furthest behind
goes next, so a key's 20,000-job backlog does not hold back another key's job, and a
key of weight 2 gets twice the share of one of weight 1 while both wait.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from dispatcher.jobs import Job

# Callers whose virtual time is remembered before the furthest ahead are forgotten.
VIRTUAL_TIMES_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Share:
    """Whose work it is: the caller, its class and its weight."""

    tenant: str = ""
    batch: bool = False
    weight: float = 1.0


DEFAULT_SHARE = Share()


def share_of(job: Job) -> Share:
    """The share a job's calls are served under (from its key's policy at submission)."""
    return Share(tenant=job.owner or "", batch=job.priority == "batch", weight=job.weight)


class FairClock:
    """The callers' virtual times."""

    def __init__(self) -> None:
        self._virtual: dict[str, float] = {}
        self._now = 0.0

    def order(self, share: Share) -> tuple[bool, float]:
        """Sort key: interactive first, then the caller furthest behind."""
        return share.batch, max(self._virtual.get(share.tenant, 0.0), self._now)

    def served(self, share: Share) -> None:
        """Count one slot (or start) for the caller."""
        start = max(self._virtual.get(share.tenant, 0.0), self._now)
        self._virtual[share.tenant] = start + 1.0 / share.weight
        self._now = start
        if len(self._virtual) > VIRTUAL_TIMES_MAX:
            ahead = sorted(self._virtual, key=self._virtual.__getitem__, reverse=True)
            for tenant in ahead[: len(ahead) // 2]:
                del self._virtual[tenant]


class FairQueue:
    """Job ids waiting to start, handed out in fair order (one FIFO per caller)."""

    def __init__(self) -> None:
        self._clock = FairClock()
        self._waiting: dict[Share, collections.deque[str]] = {}
        self._size = 0
        self._ready = asyncio.Event()

    def qsize(self) -> int:
        """Ids waiting."""
        return self._size

    def put_nowait(self, job_id: str, share: Share = DEFAULT_SHARE) -> None:
        """Queue an id under its caller's share."""
        self._waiting.setdefault(share, collections.deque()).append(job_id)
        self._size += 1
        self._ready.set()

    async def get(self) -> tuple[str, Share]:
        """The next id in fair order (waiting for one), with its share."""
        while not self._size:
            self._ready.clear()
            await self._ready.wait()
        share = min(self._waiting, key=self._clock.order)
        ids = self._waiting[share]
        job_id = ids.popleft()
        if not ids:
            del self._waiting[share]
        self._size -= 1
        self._clock.served(share)
        return job_id, share
