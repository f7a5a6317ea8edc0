"""Submission's rules (`Submitter.submit`) over the real memory store and job manager.

Only the queue is a test double (it records admissions and dispatches, and can be
told to refuse); the store is the real `MemoryJobStore` behind a thin wrapper that
can be told to fail the way Firestore does (`StoreUnavailable`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from dispatcher.errors import (
    IdempotencyConflict,
    InvalidRequest,
    JobNotStored,
    Overloaded,
    PublishFailed,
    StoreUnavailable,
)
from dispatcher.jobs import Job, JobStatus
from dispatcher.lifecycle import JobManager, Lifecycle
from dispatcher.memory_store import MemoryJobStore
from dispatcher.regions import RoundRobin, session_region
from dispatcher.settings import ModelConfig
from dispatcher.store import Change, JobQuery
from dispatcher.submission import Submission, Submitter
from tests.conftest import MODEL, REGIONS, Clock

OTHER_MODEL = "gemini-other"
OTHER_REGIONS = ("us-east5", "europe-west1")
UNCONFIGURED_REGION = "me-central2"


def prompt(text: str = "hello") -> dict[str, Any]:
    """A minimal GenerateContentRequest."""
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def cached(region: str) -> dict[str, Any]:
    """A request naming a context cache that lives in `region`."""
    return {**prompt(), "cachedContent": f"projects/p/locations/{region}/cachedContents/c1"}


class RecordingQueue:
    """A `JobQueue` that records what it is asked and refuses when told to."""

    def __init__(self) -> None:
        self.admitted = 0
        self.cancelled = 0
        self.dispatched: list[Job] = []
        self.overloaded = False
        self.publish_fails = False

    @property
    def held(self) -> int:
        """Admissions taken and not given back."""
        return self.admitted - self.cancelled

    def admit(self) -> None:
        if self.overloaded:
            raise Overloaded(retry_after_s=1)
        self.admitted += 1

    def cancel_admission(self) -> None:
        self.cancelled += 1

    async def dispatch(self, job: Job) -> None:
        if self.publish_fails:
            raise PublishFailed("the topic is unreachable")
        self.dispatched.append(job)

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to release."""


class FlakyStore:
    """The memory store, with creates and updates that can be told to fail like Firestore's.

    `reads_meet` makes the first `get` calls wait for each other after reading, so
    concurrent submissions all read before any of them writes (a real store's round
    trip leaves that window open; the memory store never awaits).
    """

    def __init__(self, inner: MemoryJobStore) -> None:
        self.inner = inner
        self.created: list[Job] = []
        self.create_fails = False
        self.update_fails = False
        self.reads_meet: asyncio.Barrier | None = None

    async def create(self, job: Job) -> None:
        if self.create_fails:
            raise StoreUnavailable("Firestore write failed: 503 unavailable")
        await self.inner.create(job)
        self.created.append(job)

    async def get(self, job_id: str) -> Job | None:
        job = await self.inner.get(job_id)
        meeting = self.reads_meet
        if meeting is not None:
            await meeting.wait()  # the answer is on its way back: the others read meanwhile
            self.reads_meet = None  # once: later reads (the replay's) go straight through
        return job

    async def get_many(self, job_ids: Sequence[str]) -> dict[str, Job]:
        return await self.inner.get_many(job_ids)

    async def update(self, job_id: str, change: Change) -> Job | None:
        if self.update_fails:
            raise StoreUnavailable("Firestore update failed: 503 unavailable")
        return await self.inner.update(job_id, change)

    async def due(self, now: datetime, limit: int) -> list[Job]:
        return await self.inner.due(now, limit)

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        return await self.inner.list_jobs(query)

    async def count_by_status(
        self, owner: str | None, since: datetime | None
    ) -> dict[JobStatus, int]:
        return await self.inner.count_by_status(owner, since)

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Rig:
    """A submitter and the parts a test inspects."""

    submitter: Submitter
    queue: RecordingQueue
    store: FlakyStore
    manager: JobManager
    models: dict[str, ModelConfig] = field(default_factory=dict)

    async def stored(self) -> list[Job]:
        """Every job written, as it stands now."""
        jobs = [await self.manager.get(job.job_id) for job in self.store.created]
        return [job for job in jobs if job is not None]


@pytest.fixture
def rig_factory(clock: Clock) -> Callable[..., Rig]:
    """Builds a submitter over a fresh memory store and a recording queue."""

    def make(*, default_model: str = MODEL, seed: int = 0) -> Rig:
        store = FlakyStore(MemoryJobStore(max_jobs=1000, clock=clock))
        manager = JobManager(
            store,
            Lifecycle(lease_s=30, job_ttl_s=3600, publish_grace_s=60, max_delivery_attempts=5),
            clock=clock,
        )
        models = {
            MODEL: ModelConfig(model_id=MODEL, regions=REGIONS),
            OTHER_MODEL: ModelConfig(model_id=OTHER_MODEL, regions=OTHER_REGIONS),
        }
        rng = random.Random(seed)
        round_robin = {name: RoundRobin(m.regions, rng=rng) for name, m in models.items()}
        queue = RecordingQueue()
        submitter = Submitter(
            manager, queue, models=models, default_model=default_model, round_robin=round_robin
        )
        return Rig(submitter=submitter, queue=queue, store=store, manager=manager, models=models)

    return make


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    """A submitter with the defaults."""
    return rig_factory()


# --- Storing and dispatching -------------------------------------------------------


async def test_job_is_stored_pending_and_dispatched_once(rig: Rig) -> None:
    """A submission stores one pending job and hands exactly that job to the queue once."""
    accepted = await rig.submitter.submit(Submission(request=prompt()))
    assert accepted.replayed is False
    assert await rig.stored() == [accepted.job]
    assert accepted.job.status is JobStatus.PENDING
    assert rig.queue.dispatched == [accepted.job]
    assert rig.queue.held == 1


@pytest.mark.parametrize(("asked", "expected"), [(None, MODEL), (OTHER_MODEL, OTHER_MODEL)])
async def test_model_is_the_asked_one_or_the_default(
    rig: Rig, asked: str | None, expected: str
) -> None:
    """A job runs the model asked for, and the default model when none is asked."""
    accepted = await rig.submitter.submit(Submission(request=prompt(), model=asked))
    assert accepted.job.model == expected
    assert accepted.job.region in rig.models[expected].regions


async def test_unconfigured_model_is_refused_by_name(rig: Rig) -> None:
    """An unconfigured model raises InvalidRequest naming it; nothing is admitted or stored."""
    with pytest.raises(InvalidRequest, match="gemini-unknown"):
        await rig.submitter.submit(Submission(request=prompt(), model="gemini-unknown"))
    assert (rig.queue.admitted, rig.store.created) == (0, [])


# --- Routing -----------------------------------------------------------------------


@pytest.mark.parametrize("region", REGIONS)
async def test_cached_content_pins_its_region(rig: Rig, region: str) -> None:
    """A request naming a cachedContent in region R is assigned R, whatever the round robin."""
    regions = {
        (await rig.submitter.submit(Submission(request=cached(region)))).job.region
        for _ in range(len(REGIONS))
    }
    assert regions == {region}


@pytest.mark.parametrize(
    ("model", "region"), [(MODEL, UNCONFIGURED_REGION), (OTHER_MODEL, REGIONS[0])]
)
async def test_cached_content_in_an_unconfigured_region_is_refused(
    rig: Rig, model: str, region: str
) -> None:
    """A cache in a region the model is not configured for raises InvalidRequest naming
    the region; nothing is admitted or stored."""
    with pytest.raises(InvalidRequest, match=region):
        await rig.submitter.submit(Submission(request=cached(region), model=model))
    assert (rig.queue.admitted, rig.store.created) == (0, [])


@pytest.mark.parametrize("session_id", ["s1", "user-42/chat-7", "é" * 40])
async def test_session_keeps_one_region(rig_factory: Callable[..., Rig], session_id: str) -> None:
    """A session id gets session_region's region on every submission and every instance."""
    expected = session_region(REGIONS, session_id)
    regions = set()
    for seed in range(3):  # instances whose round robins start at different offsets
        rig = rig_factory(seed=seed)
        for _ in range(len(REGIONS)):
            accepted = await rig.submitter.submit(
                Submission(request=prompt(), session_id=session_id)
            )
            regions.add(accepted.job.region)
    assert regions == {expected}


# --- Idempotency ---------------------------------------------------------------------


async def test_same_key_and_body_replays_the_job(rig: Rig) -> None:
    """The same Idempotency-Key and body answer the first job, replayed, with no second
    dispatch and no second admission held."""
    submission = Submission(request=prompt(), idempotency_key="k-1", owner="alice")
    first = await rig.submitter.submit(submission)
    again = await rig.submitter.submit(submission)
    assert (first.replayed, again.replayed) == (False, True)
    assert again.job == first.job
    assert rig.queue.dispatched == [first.job]
    assert rig.queue.held == 1
    assert len(rig.store.created) == 1


@pytest.mark.parametrize("changed", [{"request": prompt("another prompt")}, {"model": OTHER_MODEL}])
async def test_same_key_other_body_conflicts(rig: Rig, changed: dict[str, Any]) -> None:
    """The same Idempotency-Key with another body (or model) raises IdempotencyConflict."""
    first = Submission(request=prompt(), idempotency_key="k-1", owner="alice")
    await rig.submitter.submit(first)
    other = Submission(**{**_fields(first), **changed})
    with pytest.raises(IdempotencyConflict):
        await rig.submitter.submit(other)
    assert len(rig.queue.dispatched) == 1
    assert rig.queue.held == 1


async def test_concurrent_same_key_make_one_job(rig: Rig) -> None:
    """Two concurrent submissions with one key and body, both reading before either
    writes, store one job and both answer with it (one of them replayed)."""
    rig.store.reads_meet = asyncio.Barrier(2)
    submission = Submission(request=prompt(), idempotency_key="k-race", owner="alice")
    answers = await asyncio.gather(
        rig.submitter.submit(submission), rig.submitter.submit(submission)
    )
    assert len(rig.store.created) == 1
    assert {answer.job.job_id for answer in answers} == {rig.store.created[0].job_id}
    assert sorted(answer.replayed for answer in answers) == [False, True]
    assert len(rig.queue.dispatched) == 1
    # Both were admitted (both found no job); the loser of the create gave its admission back.
    assert (rig.queue.admitted, rig.queue.cancelled) == (2, 1)


# --- Admission and compensation ------------------------------------------------------


async def test_overloaded_stores_nothing(rig: Rig) -> None:
    """Overloaded on admit propagates and nothing is stored or dispatched."""
    rig.queue.overloaded = True
    with pytest.raises(Overloaded):
        await rig.submitter.submit(Submission(request=prompt()))
    assert (rig.store.created, rig.queue.dispatched) == ([], [])


async def test_store_unavailable_gives_back_the_admission(rig: Rig) -> None:
    """StoreUnavailable on create raises JobNotStored, gives the admission back and
    dispatches nothing."""
    rig.store.create_fails = True
    with pytest.raises(JobNotStored):
        await rig.submitter.submit(Submission(request=prompt()))
    assert (rig.queue.admitted, rig.queue.cancelled) == (1, 1)
    assert rig.queue.dispatched == []


async def test_publish_failure_fails_the_stored_job(rig: Rig) -> None:
    """PublishFailed on dispatch gives the admission back, marks the stored job failed
    with 503 UNAVAILABLE, and re-raises PublishFailed."""
    rig.queue.publish_fails = True
    with pytest.raises(PublishFailed):
        await rig.submitter.submit(Submission(request=prompt()))
    assert (rig.queue.admitted, rig.queue.cancelled) == (1, 1)
    [job] = await rig.stored()
    assert job.status is JobStatus.FAILED
    assert job.error is not None and (job.error.code, job.error.status) == (503, "UNAVAILABLE")
    assert job.sweep_at is None


async def test_publish_failure_unrecorded_leaves_job_for_the_sweep(rig: Rig, clock: Clock) -> None:
    """When marking the unpublished job failed also fails, PublishFailed is still raised,
    the admission given back, and the job stays pending, due for the recovery sweep."""
    rig.queue.publish_fails = True
    rig.store.update_fails = True
    with pytest.raises(PublishFailed):
        await rig.submitter.submit(Submission(request=prompt()))
    assert (rig.queue.admitted, rig.queue.cancelled) == (1, 1)
    rig.store.update_fails = False
    [job] = await rig.stored()
    assert job.status is JobStatus.PENDING
    clock.advance(rig.manager.rules.publish_grace_s)
    assert [due.job_id for due in await rig.manager.due(limit=10)] == [job.job_id]


def _fields(submission: Submission) -> dict[str, Any]:
    return {name: getattr(submission, name) for name in Submission.__dataclass_fields__}
