"""One behaviour suite, run over both stores: the memory store and Firestore (emulator).

The records (create, get, update, due) and the lifecycle rules on top of them (leases
make execution idempotent) must hold the same over either store. The memory case needs
no emulator and always runs; the Firestore case is skipped, with the reason, when the
emulator is missing. What only the memory store does (its bounds, eviction) is in
tests/unit/test_memory_store.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import timedelta

import pytest

from dispatcher.errors import JobExists
from dispatcher.jobs import Job, JobError, JobStatus
from dispatcher.lifecycle import ClaimOutcome, JobManager, Lifecycle, Progress
from dispatcher.memory_store import MemoryJobStore
from dispatcher.store import JobQuery, JobStore
from tests.conftest import Clock
from tests.support.stack import PROJECT, unique

ERROR = JobError(code=503, status="UNAVAILABLE", message="down")


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


# --- The lifecycle rules, over each store ------------------------------------------


@pytest.fixture
def manager(store: JobStore, clock: Clock) -> JobManager:
    """A manager over each store, empty, with 30 s leases."""
    rules = Lifecycle(lease_s=30, job_ttl_s=3600, publish_grace_s=60, max_delivery_attempts=5)
    return JobManager(store, rules, clock=clock)


async def stored(manager: JobManager, job_factory: Callable[..., Job], **fields: object) -> Job:
    job = job_factory(**fields)
    await manager.store.create(job)
    return job


async def test_claim_takes_a_pending_job(
    manager: JobManager, job_factory: Callable[..., Job]
) -> None:
    """Claiming a pending job makes it running with a lease and counts a delivery."""
    job = await stored(manager, job_factory)
    claim = await manager.claim(job.job_id)
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.job is not None and claim.job.status is JobStatus.RUNNING
    assert claim.job.lease_owner == claim.lease_token
    assert claim.job.deliveries == 1
    assert claim.job.sweep_at == claim.job.lease_until


async def test_second_claim_while_leased_is_busy(
    manager: JobManager, job_factory: Callable[..., Job]
) -> None:
    """A live lease held by another execution makes a second claim BUSY."""
    job = await stored(manager, job_factory)
    await manager.claim(job.job_id)
    assert (await manager.claim(job.job_id)).outcome is ClaimOutcome.BUSY


async def test_expired_lease_is_taken_over(
    manager: JobManager, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Once a lease lapses, another execution takes the job; the old holder can't finish it."""
    job = await stored(manager, job_factory)
    first = await manager.claim(job.job_id)
    clock.advance(31)
    second = await manager.claim(job.job_id)
    assert second.outcome is ClaimOutcome.CLAIMED
    assert first.lease_token is not None
    late = await manager.succeed(
        job.job_id, first.lease_token, result={"x": 1}, progress=Progress()
    )
    assert late is None
    current = await manager.get(job.job_id)
    assert current is not None and current.status is JobStatus.RUNNING


async def test_finished_job_is_not_claimed_again(
    manager: JobManager, job_factory: Callable[..., Job]
) -> None:
    """A delivery that finds the job finished gets FINISHED, and nothing changes."""
    job = await stored(manager, job_factory)
    claim = await manager.claim(job.job_id)
    assert claim.lease_token is not None
    await manager.succeed(
        job.job_id, claim.lease_token, result={"ok": True}, progress=Progress(calls=1)
    )
    again = await manager.claim(job.job_id)
    assert again.outcome is ClaimOutcome.FINISHED
    assert again.job is not None and again.job.deliveries == 1


async def test_claim_of_unknown_job_is_missing(manager: JobManager) -> None:
    """Claiming an id with no record reports MISSING."""
    assert (await manager.claim("A" * 22)).outcome is ClaimOutcome.MISSING


async def test_succeed_records_result_calls_and_region(
    manager: JobManager, job_factory: Callable[..., Job]
) -> None:
    """Success stores the response, counts calls, keeps regions tried and the serving region."""
    job = await stored(manager, job_factory, region="us-central1")
    claim = await manager.claim(job.job_id)
    assert claim.lease_token is not None
    progress = Progress(calls=2, regions=("us-central1", "europe-west4"), served_by="europe-west4")
    done = await manager.succeed(job.job_id, claim.lease_token, result={"r": 1}, progress=progress)
    assert done is not None
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == {"r": 1}
    assert done.attempts == 2
    assert done.region == "europe-west4"
    assert done.regions_tried == ("us-central1", "europe-west4")
    assert done.sweep_at is None and done.lease_owner is None


async def test_release_returns_job_to_pending_with_calls_counted(
    manager: JobManager, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Releasing after transient failures keeps the calls made and schedules a sweep."""
    job = await stored(manager, job_factory)
    claim = await manager.claim(job.job_id)
    assert claim.lease_token is not None
    released = await manager.release(
        job.job_id, claim.lease_token, progress=Progress(calls=4), retry_in_s=10, error=ERROR
    )
    assert released is not None
    assert released.status is JobStatus.PENDING
    assert released.attempts == 4
    assert released.lease_owner is None
    assert released.sweep_at is not None and released.sweep_at > clock()


async def test_renew_extends_only_our_lease(
    manager: JobManager, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Renewal moves lease_until on for the holder and fails for anyone else."""
    job = await stored(manager, job_factory)
    claim = await manager.claim(job.job_id)
    assert claim.lease_token is not None and claim.job is not None
    clock.advance(10)
    assert await manager.renew(job.job_id, claim.lease_token)
    renewed = await manager.get(job.job_id)
    assert renewed is not None and renewed.lease_until is not None
    assert claim.job.lease_until is not None and renewed.lease_until > claim.job.lease_until
    assert not await manager.renew(job.job_id, "not-the-holder")


async def test_fail_pending_only_touches_pending_jobs(
    manager: JobManager, job_factory: Callable[..., Job]
) -> None:
    """A job whose dispatch failed is failed at once; a running one is left alone."""
    job = await stored(manager, job_factory)
    failed = await manager.fail_pending(job.job_id, ERROR)
    assert failed is not None and failed.status is JobStatus.FAILED
    other = await stored(manager, job_factory)
    await manager.claim(other.job_id)
    assert await manager.fail_pending(other.job_id, ERROR) is None
    untouched = await manager.get(other.job_id)
    assert untouched is not None and untouched.status is JobStatus.RUNNING


async def test_only_one_sweeper_wins(
    manager: JobManager, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Two sweepers that saw the same due job: exactly one gets to re-dispatch it."""
    job = await stored(manager, job_factory)
    clock.advance(61)
    [due] = await manager.due(10)
    assert due.sweep_at is not None
    wins = [await manager.postpone_sweep(job.job_id, due.sweep_at) for _ in range(2)]
    assert wins == [True, False]
    assert await manager.due(10) == []


# --- Firestore only -----------------------------------------------------------------


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


# --- Listing a caller's jobs ----------------------------------------------------------


async def _listed(store: JobStore, job_factory: Callable[..., Job], clock: Clock) -> list[Job]:
    """Five jobs of alice, one a second apart (two of them succeeded), and one of bob."""
    jobs = []
    for index in range(5):
        status = JobStatus.SUCCEEDED if index in (1, 3) else JobStatus.PENDING
        job = job_factory(owner="alice", status=status, created_at=clock())
        await store.create(job)
        jobs.append(job)
        clock.advance(1)
    await store.create(job_factory(owner="bob", created_at=clock()))
    return jobs


async def test_list_jobs_is_the_owners_newest_first(
    store: JobStore, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """list_jobs gives only the owner's jobs, newest first, at most `limit`."""
    jobs = await _listed(store, job_factory, clock)
    listed = await store.list_jobs(JobQuery(owner="alice", limit=3))
    assert [job.job_id for job in listed] == [job.job_id for job in reversed(jobs)][:3]


async def test_list_jobs_pages_after_the_last_seen(
    store: JobStore, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """Starting after a listed job gives the ones older than it, none twice."""
    jobs = await _listed(store, job_factory, clock)
    first = await store.list_jobs(JobQuery(owner="alice", limit=2))
    last = first[-1]
    rest = await store.list_jobs(
        JobQuery(owner="alice", after=(last.created_at, last.job_id), limit=10)
    )
    assert [job.job_id for job in first + rest] == [job.job_id for job in reversed(jobs)]


async def test_list_jobs_filters_by_status_and_creation_time(
    store: JobStore, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """status and since narrow the listing (since is inclusive)."""
    jobs = await _listed(store, job_factory, clock)
    succeeded = await store.list_jobs(JobQuery(owner="alice", status=JobStatus.SUCCEEDED))
    assert [job.job_id for job in succeeded] == [jobs[3].job_id, jobs[1].job_id]
    recent = await store.list_jobs(JobQuery(owner="alice", since=jobs[3].created_at))
    assert [job.job_id for job in recent] == [jobs[4].job_id, jobs[3].job_id]


async def test_count_by_status_counts_the_owners_jobs(
    store: JobStore, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """count_by_status gives every state, counting only the owner's jobs since `since`."""
    jobs = await _listed(store, job_factory, clock)
    counts = await store.count_by_status("alice", None)
    assert counts == {**dict.fromkeys(JobStatus, 0), JobStatus.PENDING: 3, JobStatus.SUCCEEDED: 2}
    since = await store.count_by_status("alice", jobs[2].created_at)
    assert (since[JobStatus.PENDING], since[JobStatus.SUCCEEDED]) == (2, 1)


# --- The completion events' outbox ----------------------------------------------------


async def test_a_final_job_owes_its_event_until_it_is_sent(
    store: JobStore, job_factory: Callable[..., Job], clock: Clock
) -> None:
    """With completion events on, the write that makes a job final marks its event owed
    with a sweep time; the job is due once that passes, exactly one sweeper can take it
    (postpone_sweep), and event_sent clears the mark so it is never due again."""
    rules = Lifecycle(
        lease_s=30,
        job_ttl_s=3600,
        publish_grace_s=60,
        max_delivery_attempts=5,
        completion_events=True,
    )
    manager = JobManager(store, rules, clock=clock)
    job = job_factory()
    await store.create(job)
    claim = await manager.claim(job.job_id)
    assert claim.lease_token is not None
    done = await manager.succeed(
        job.job_id, claim.lease_token, result={"ok": True}, progress=Progress()
    )
    assert done is not None and done.event_pending and done.sweep_at is not None
    assert await manager.due(10) == []
    clock.advance(61)
    [owed] = await manager.due(10)
    assert owed.job_id == job.job_id and owed.status is JobStatus.SUCCEEDED
    assert owed.sweep_at is not None
    assert await manager.postpone_sweep(job.job_id, owed.sweep_at)
    assert not await manager.postpone_sweep(job.job_id, owed.sweep_at)
    await manager.event_sent(job.job_id)
    clock.advance(3600)
    assert await manager.due(10) == []
    final = await store.get(job.job_id)
    assert final is not None and not final.event_pending and final.sweep_at is None
