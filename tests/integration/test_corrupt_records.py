"""A Firestore job document that cannot be decoded, on the emulator.

Such a record is a permanent fault of that one job, never an outage: a single read
raises `CorruptRecord` (not `StoreUnavailable`, which callers retry), batch reads skip
it and return the rest, an execution acknowledges its delivery without calling Vertex,
and `GET /jobs/{id}` answers 500 DATA_LOSS. The damage is done the way it would happen
for real: a valid record is stored, then changed by another writer through a plain
Firestore client, behind the store's back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from google.cloud import firestore

from dispatcher.errors import CorruptRecord, StoreUnavailable
from dispatcher.executor import JobExecutor, RunResult
from dispatcher.firestore_store import FirestoreJobStore
from dispatcher.jobs import Job
from dispatcher.lifecycle import JobManager, Lifecycle
from dispatcher.regions import PoolConfig, RegionPool
from dispatcher.settings import ModelConfig
from dispatcher.vertex import RetryPolicy, VertexClient
from tests.conftest import MODEL, REGIONS, Clock
from tests.support.stack import PROJECT, Stack, unique
from tests.support.standin import serving_standin

pytestmark = pytest.mark.integration

# Ways a stored document can stop being a job record, as Firestore field changes.
CORRUPTIONS: dict[str, dict[str, Any]] = {
    "unknown status": {"status": "bogus"},
    "missing model": {"model": firestore.DELETE_FIELD},
    "missing created_at": {"created_at": firestore.DELETE_FIELD},
    "request not JSON": {"request_json": "{not json"},
    "attempts not a number": {"attempts": "many"},
}


@dataclass
class Corrupter:
    """A store on a fresh collection, and a plain client to damage its documents."""

    store: FirestoreJobStore
    client: firestore.AsyncClient
    collection: str

    async def corrupt(self, job_id: str, fields: dict[str, Any]) -> None:
        """Change a stored document's fields directly, bypassing the store."""
        await self.client.collection(self.collection).document(job_id).update(fields)

    async def stored_corrupt(self, job: Job, fields: dict[str, Any]) -> Job:
        """Store `job` through the store, then damage its document."""
        await self.store.create(job)
        await self.corrupt(job.job_id, fields)
        return job


@contextlib.asynccontextmanager
async def corrupter_on(collection: str) -> AsyncIterator[Corrupter]:
    """A Corrupter on `collection` (FIRESTORE_EMULATOR_HOST must be set)."""
    store = FirestoreJobStore.connect(project=PROJECT, database="(default)", collection=collection)
    client = firestore.AsyncClient(project=PROJECT, database="(default)")
    try:
        yield Corrupter(store=store, client=client, collection=collection)
    finally:
        client.close()
        await store.close()


@pytest.fixture
async def corrupter(
    firestore_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Corrupter]:
    """A Corrupter on a collection no other test uses, on the emulator."""
    for key, value in firestore_env.items():
        monkeypatch.setenv(key, value)
    async with corrupter_on(unique("jobs")) as made:
        yield made


@pytest.fixture(params=list(CORRUPTIONS))
def corruption(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each kind of damage."""
    return CORRUPTIONS[request.param]


async def test_get_raises_corrupt_record(
    corrupter: Corrupter, job_factory: Callable[..., Job], corruption: dict[str, Any]
) -> None:
    """Reading an undecodable document raises CorruptRecord, not StoreUnavailable."""
    job = await corrupter.stored_corrupt(job_factory(), corruption)
    with pytest.raises(CorruptRecord) as raised:
        await corrupter.store.get(job.job_id)
    assert not isinstance(raised.value, StoreUnavailable)
    assert job.job_id in str(raised.value)


async def test_get_many_skips_the_corrupt_record(
    corrupter: Corrupter, job_factory: Callable[..., Job], corruption: dict[str, Any]
) -> None:
    """A batch read returns the valid records and leaves the undecodable one out."""
    valid = [job_factory(), job_factory()]
    for job in valid:
        await corrupter.store.create(job)
    broken = await corrupter.stored_corrupt(job_factory(), corruption)
    found = await corrupter.store.get_many([valid[0].job_id, broken.job_id, valid[1].job_id])
    assert found == {job.job_id: job for job in valid}


async def test_due_skips_the_corrupt_record(
    corrupter: Corrupter,
    job_factory: Callable[..., Job],
    clock: Clock,
    corruption: dict[str, Any],
) -> None:
    """The sweep's query returns the valid due records, in order, without the undecodable one."""
    now = clock()
    first = job_factory(sweep_at=now - timedelta(seconds=30))
    broken = job_factory(sweep_at=now - timedelta(seconds=20))
    last = job_factory(sweep_at=now - timedelta(seconds=10))
    await corrupter.store.create(first)
    await corrupter.stored_corrupt(broken, corruption)
    await corrupter.store.create(last)
    due = await corrupter.store.due(now, limit=10)
    assert [job.job_id for job in due] == [first.job_id, last.job_id]


async def test_run_of_a_corrupt_record_is_done_without_vertex(
    corrupter: Corrupter, job_factory: Callable[..., Job], corruption: dict[str, Any]
) -> None:
    """An execution of an undecodable record returns DONE (acknowledged, not redelivered
    for ever) and never calls Vertex; the record is left as it was."""
    job = await corrupter.stored_corrupt(job_factory(), corruption)
    manager = JobManager(
        corrupter.store,
        Lifecycle(lease_s=30, job_ttl_s=3600, publish_grace_s=60, max_delivery_attempts=3),
    )
    async with serving_standin() as standin:
        vertex = VertexClient(
            standin.session,
            project="p",
            pool=RegionPool(PoolConfig(cooldown_initial_s=0.01, cooldown_max_s=0.02)),
            policy=RetryPolicy(
                max_retries=1,
                backoff_initial_s=0.001,
                backoff_max_s=0.01,
                attempt_timeout_s=5,
                budget_s=30,
            ),
            endpoint=standin.url,
        )
        executor = JobExecutor(
            manager,
            vertex,
            {MODEL: ModelConfig(model_id=MODEL, regions=REGIONS)},
            requeue_delay_s=0.01,
        )
        outcome = await executor.run(job.job_id)
        calls = (await standin.stats())["total_calls"]
    assert outcome.result is RunResult.DONE
    assert calls == 0
    with pytest.raises(CorruptRecord):
        await corrupter.store.get(job.job_id)


async def test_get_job_answers_data_loss(
    stack_factory: Callable[..., Stack],
    job_factory: Callable[..., Job],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET /jobs/{id} of an undecodable record answers 500 DATA_LOSS in the error shape."""
    stack = stack_factory("firestore")
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", stack.env["FIRESTORE_EMULATOR_HOST"])
    async with corrupter_on(stack.env["FIRESTORE_COLLECTION"]) as on_stack:
        job = await on_stack.stored_corrupt(job_factory(), CORRUPTIONS["unknown status"])
    response = stack.http.get(f"{stack.ingress.url}/jobs/{job.job_id}")
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "status", "message"}
    assert (error["code"], error["status"]) == (500, "DATA_LOSS")
