"""The job lifecycle rules: leases make execution idempotent, on the memory store."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dispatcher.jobs import Job, JobError, JobStatus
from dispatcher.lifecycle import ClaimOutcome, JobManager, Lifecycle, Progress
from dispatcher.memory_store import MemoryJobStore
from tests.conftest import Clock

ERROR = JobError(code=503, status="UNAVAILABLE", message="down")


@pytest.fixture
def manager(clock: Clock) -> JobManager:
    """A manager over a fresh memory store, 30 s leases."""
    rules = Lifecycle(lease_s=30, job_ttl_s=3600, publish_grace_s=60)
    return JobManager(MemoryJobStore(max_jobs=100, clock=clock), rules, clock=clock)


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
