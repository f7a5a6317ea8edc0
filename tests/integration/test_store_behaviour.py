"""One behaviour suite, run over both stores: the memory store and Firestore (emulator)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta

import pytest

from dispatcher.errors import JobExists
from dispatcher.jobs import Job, JobError, JobStatus
from dispatcher.memory_store import MemoryJobStore
from dispatcher.store import JobStore
from tests.conftest import Clock
from tests.support.stack import PROJECT, unique


@pytest.fixture(params=["memory", pytest.param("firestore", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[JobStore]:
    """Each store, empty."""
    if request.param == "memory":
        yield MemoryJobStore(max_jobs=1000, clock=clock)
        return
    from dispatcher.firestore_store import FirestoreJobStore

    env = request.getfixturevalue("firestore_env")
    monkeypatch = request.getfixturevalue("monkeypatch")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    firestore_store = FirestoreJobStore.connect(
        project=PROJECT, database="(default)", collection=unique("jobs")
    )
    yield firestore_store
    await firestore_store.close()


async def test_create_then_get_round_trips(
    store: JobStore, job_factory: Callable[..., Job]
) -> None:
    """A stored job reads back equal, field for field."""
    job = job_factory(regions_tried=("a-east1",), session_id="s1")
    await store.create(job)
    assert await store.get(job.job_id) == job


async def test_get_unknown_is_none(store: JobStore) -> None:
    """An id with no record reads as None."""
    assert await store.get("Z" * 22) is None


async def test_create_twice_raises(store: JobStore, job_factory: Callable[..., Job]) -> None:
    """Creating an existing id raises JobExists (the idempotency gate)."""
    job = job_factory()
    await store.create(job)
    with pytest.raises(JobExists):
        await store.create(job)


async def test_update_applies_change(store: JobStore, job_factory: Callable[..., Job]) -> None:
    """update() stores the change's result and returns it."""
    job = job_factory()
    await store.create(job)
    error = JobError(code=429, status="RESOURCE_EXHAUSTED", message="full")
    changed = await store.update(
        job.job_id, lambda j: replace(j, status=JobStatus.FAILED, error=error, sweep_at=None)
    )
    assert changed is not None and changed.status is JobStatus.FAILED
    assert await store.get(job.job_id) == changed


async def test_update_returning_none_leaves_record(
    store: JobStore, job_factory: Callable[..., Job]
) -> None:
    """A change that returns None writes nothing and returns the current record."""
    job = job_factory()
    await store.create(job)
    assert await store.update(job.job_id, lambda j: None) == job


async def test_update_unknown_is_none(store: JobStore) -> None:
    """update() of a missing record returns None."""
    assert await store.update("Y" * 22, lambda j: j) is None


async def test_concurrent_updates_do_not_lose_writes(
    store: JobStore, job_factory: Callable[..., Job]
) -> None:
    """Six concurrent increments of one record all land: updates are atomic."""
    job = job_factory()
    await store.create(job)
    await asyncio.gather(
        *(store.update(job.job_id, lambda j: replace(j, attempts=j.attempts + 1)) for _ in range(6))
    )
    final = await store.get(job.job_id)
    assert final is not None and final.attempts == 6


async def test_due_lists_only_passed_sweep_times(
    store: JobStore, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """due() returns unfinished jobs whose sweep_at has passed, oldest first, nothing else."""
    now = clock()
    late = job_factory(sweep_at=now - timedelta(seconds=10))
    later = job_factory(sweep_at=now - timedelta(seconds=5))
    future = job_factory(sweep_at=now + timedelta(seconds=60))
    finished = job_factory(status=JobStatus.SUCCEEDED, sweep_at=None, result={"ok": 1})
    for job in (later, future, late, finished):
        await store.create(job)
    due = await store.due(now, limit=10)
    assert [j.job_id for j in due] == [late.job_id, later.job_id]
    assert [j.job_id for j in await store.due(now, limit=1)] == [late.job_id]


@pytest.mark.parametrize("size", [1000, 3 * 1024 * 1024])
async def test_large_request_and_result_round_trip(
    store: JobStore, job_factory: Callable[..., Job], size: int
) -> None:
    """Requests and results beyond one Firestore document (1 MiB) are stored whole."""
    request = {"contents": [{"role": "user", "parts": [{"text": "é" * size}]}]}
    job = job_factory(request=request)
    await store.create(job)
    result = {"candidates": [{"content": {"parts": [{"text": "ü" * size}]}}]}
    await store.update(
        job.job_id, lambda j: replace(j, status=JobStatus.SUCCEEDED, result=result, sweep_at=None)
    )
    stored = await store.get(job.job_id)
    assert stored is not None
    assert stored.request == request
    assert stored.result == result


@pytest.mark.integration
async def test_a_write_by_another_process_is_never_overwritten(
    firestore_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    job_factory: Callable[..., Job],
) -> None:
    """A store that skips the read for a record it wrote last still sees another's write since."""
    from dispatcher.firestore_store import FirestoreJobStore

    for key, value in firestore_env.items():
        monkeypatch.setenv(key, value)
    collection = unique("jobs")
    first, second = (
        FirestoreJobStore.connect(project=PROJECT, database="(default)", collection=collection)
        for _ in range(2)
    )
    try:
        job = job_factory()
        await first.create(job)
        await first.update(job.job_id, lambda j: replace(j, status=JobStatus.RUNNING))
        await second.update(job.job_id, lambda j: replace(j, deliveries=j.deliveries + 7))
        # `first` remembers its own write; its precondition fails and it reads again.
        after = await first.update(job.job_id, lambda j: replace(j, attempts=j.attempts + 1))
        assert after is not None and after.deliveries == job.deliveries + 7
        stored = await second.get(job.job_id)
        assert stored is not None
        assert (stored.deliveries, stored.attempts) == (job.deliveries + 7, job.attempts + 1)
    finally:
        await first.close()
        await second.close()
