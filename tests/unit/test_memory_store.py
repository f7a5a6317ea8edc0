"""The memory store's own bounds (the shared behaviour suite covers the rest)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from dispatcher.jobs import Job, JobStatus
from dispatcher.memory_store import MemoryJobStore
from tests.conftest import Clock


def finished(job_factory: Callable[..., Job], **fields: object) -> Job:
    return job_factory(status=JobStatus.SUCCEEDED, result={"ok": True}, sweep_at=None, **fields)


async def test_oldest_finished_jobs_are_evicted_past_the_count(
    job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Beyond max_jobs, the oldest finished records go first; the count stays at the bound."""
    store = MemoryJobStore(max_jobs=3, clock=clock)
    jobs = [finished(job_factory) for _ in range(5)]
    for job in jobs:
        await store.create(job)
    assert len(store) == 3
    assert [await store.get(j.job_id) is not None for j in jobs] == [False, False, True, True, True]


async def test_unfinished_jobs_are_never_evicted(
    job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Pending jobs stay even past the count; only finished ones make room."""
    store = MemoryJobStore(max_jobs=2, clock=clock)
    pending = [job_factory() for _ in range(3)]
    for job in pending:
        await store.create(job)
    assert all([await store.get(j.job_id) is not None for j in pending])


async def test_expired_finished_jobs_are_dropped(
    job_factory: Callable[..., Job], clock: Clock
) -> None:
    """A finished record past its expire_at reads as gone and is evicted."""
    store = MemoryJobStore(max_jobs=100, clock=clock)
    job = finished(job_factory, expire_at=clock() + timedelta(seconds=10))
    await store.create(job)
    clock.advance(11)
    assert await store.get(job.job_id) is None
    assert len(store) == 0


async def test_job_finishing_by_update_becomes_evictable(
    job_factory: Callable[..., Job], clock: Clock
) -> None:
    """A job that finishes through update() joins the eviction order."""
    from dataclasses import replace

    store = MemoryJobStore(max_jobs=1, clock=clock)
    job = job_factory()
    await store.create(job)
    await store.update(job.job_id, lambda j: replace(j, status=JobStatus.FAILED, sweep_at=None))
    newer = job_factory()
    await store.create(newer)
    assert await store.get(job.job_id) is None
    assert await store.get(newer.job_id) is not None
