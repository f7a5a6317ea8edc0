"""Job execution with the memory store and the stand-in: the rules both services share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from dispatcher.devtools.vertex_standin import StandinConfig, create_app
from dispatcher.executor import JobExecutor, RunResult
from dispatcher.jobs import Job, JobStatus
from dispatcher.lifecycle import JobManager, Lifecycle
from dispatcher.memory_store import MemoryJobStore
from dispatcher.queue import InProcessQueue
from dispatcher.regions import PoolConfig, RegionPool
from dispatcher.settings import ModelConfig
from dispatcher.vertex import RetryPolicy, VertexClient
from tests.conftest import MODEL, REGIONS


@dataclass
class Bench:
    """An executor wired to a memory store and an in-process stand-in."""

    executor: JobExecutor
    manager: JobManager
    standin: httpx.AsyncClient

    async def stats(self) -> dict[str, Any]:
        return dict((await self.standin.get("/_standin/stats")).json())


@pytest.fixture
async def bench_factory() -> AsyncIterator[Callable[..., Bench]]:
    """Builds executors over a fresh stand-in configured by a doc; overridable limits."""
    clients: list[httpx.AsyncClient] = []

    def make(
        config: dict[str, Any] | None = None,
        *,
        max_deliveries: int = 3,
        max_retries: int = 1,
        lease_s: float = 30.0,
    ) -> Bench:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(StandinConfig.from_doc(config or {}))),
            base_url="http://standin.test",
        )
        clients.append(http)
        manager = JobManager(
            MemoryJobStore(max_jobs=1000),
            Lifecycle(lease_s=lease_s, job_ttl_s=3600, publish_grace_s=60),
        )
        vertex = VertexClient(
            http,
            project="p",
            pool=RegionPool(PoolConfig(cooldown_initial_s=0.01, cooldown_max_s=0.02)),
            policy=RetryPolicy(
                max_retries=max_retries,
                backoff_initial_s=0.001,
                backoff_max_s=0.01,
                attempt_timeout_s=5,
                budget_s=30,
            ),
            endpoint="http://standin.test",
        )
        executor = JobExecutor(
            manager,
            vertex,
            {MODEL: ModelConfig(model_id=MODEL, regions=REGIONS)},
            max_deliveries=max_deliveries,
            requeue_delay_s=0.01,
        )
        return Bench(executor=executor, manager=manager, standin=http)

    yield make
    for http in clients:
        await http.aclose()


async def test_run_succeeds_and_records_result(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """A run calls Vertex once and stores its response as the result."""
    bench = bench_factory()
    job = job_factory()
    await bench.manager.store.create(job)
    outcome = await bench.executor.run(job.job_id)
    assert outcome.result is RunResult.DONE
    done = await bench.manager.get(job.job_id)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert done.attempts == 1
    assert done.result is not None and "candidates" in done.result


async def test_duplicate_delivery_does_not_call_vertex_again(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """A second run of a finished job acknowledges without a Vertex call."""
    bench = bench_factory()
    job = job_factory()
    await bench.manager.store.create(job)
    await bench.executor.run(job.job_id)
    again = await bench.executor.run(job.job_id)
    assert again.result is RunResult.DONE
    assert (await bench.stats())["total_calls"] == 1


async def test_concurrent_duplicates_call_vertex_once(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """Two runs of the same job at once: one calls Vertex, the other is told to retry."""
    bench = bench_factory({"default": {"latency_s": 0.2}})
    job = job_factory()
    await bench.manager.store.create(job)
    first, second = await asyncio.gather(
        bench.executor.run(job.job_id), bench.executor.run(job.job_id)
    )
    assert sorted(o.result.value for o in (first, second)) == ["done", "retry"]
    assert (await bench.stats())["total_calls"] == 1


async def test_permanent_error_fails_once(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """A 400 fails the job at once with Vertex's code, status and message."""
    bench = bench_factory({"default": {"status": 400}})
    job = job_factory()
    await bench.manager.store.create(job)
    outcome = await bench.executor.run(job.job_id)
    assert outcome.result is RunResult.DONE
    failed = await bench.manager.get(job.job_id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error.code == 400
    assert failed.error.status == "INVALID_ARGUMENT"
    assert failed.attempts == 1


async def test_transient_exhaustion_asks_for_retry_then_fails_at_limit(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """Spent retries release the job; at MAX_DELIVERY_ATTEMPTS it fails with the last error."""
    bench = bench_factory({"default": {"status": 503}}, max_deliveries=2, max_retries=1)
    job = job_factory()
    await bench.manager.store.create(job)
    first = await bench.executor.run(job.job_id)
    assert first.result is RunResult.RETRY
    pending = await bench.manager.get(job.job_id)
    assert pending is not None and pending.status is JobStatus.PENDING and pending.attempts == 2
    second = await bench.executor.run(job.job_id)
    assert second.result is RunResult.DONE
    failed = await bench.manager.get(job.job_id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error is not None and failed.error.code == 503
    assert failed.attempts == 4


async def test_delivery_attempt_from_pubsub_counts(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """Pub/Sub's deliveryAttempt at the limit makes a transient failure final."""
    bench = bench_factory({"default": {"status": 503}}, max_deliveries=5, max_retries=0)
    job = job_factory()
    await bench.manager.store.create(job)
    outcome = await bench.executor.run(job.job_id, delivery_attempt=5)
    assert outcome.result is RunResult.DONE
    failed = await bench.manager.get(job.job_id)
    assert failed is not None and failed.status is JobStatus.FAILED


async def test_cached_content_runs_only_in_its_region(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """A request naming a context cache runs in the cache's region, whatever was assigned."""
    bench = bench_factory()
    request = {
        "contents": [{"role": "user", "parts": [{"text": "q"}]}],
        "cachedContent": f"projects/p/locations/{REGIONS[2]}/cachedContents/7",
    }
    job = job_factory(request=request, region=REGIONS[0])
    await bench.manager.store.create(job)
    await bench.executor.run(job.job_id)
    done = await bench.manager.get(job.job_id)
    assert done is not None and done.regions_tried == (REGIONS[2],)


async def test_in_process_queue_requeues_until_success(
    bench_factory: Callable[..., Bench], job_factory: Callable[..., Job]
) -> None:
    """In modes 1 and 2 a retried job is put back on the queue and finishes."""
    every_region_fails_once = {"regions": {region: {"script": [503]} for region in REGIONS}}
    bench = bench_factory(every_region_fails_once, max_deliveries=5, max_retries=0)
    queue = InProcessQueue(bench.executor, concurrency=2, max_pending=10)
    await queue.start()
    try:
        job = job_factory()
        await bench.manager.store.create(job)
        queue.admit()
        await queue.dispatch(job)
        for _ in range(200):
            current = await bench.manager.get(job.job_id)
            if current is not None and current.status.is_terminal:
                break
            await asyncio.sleep(0.01)
        assert current is not None and current.status is JobStatus.SUCCEEDED
        # One call per run (no in-run retries): the 503 was followed by a requeued run.
        assert current.attempts == current.deliveries >= 2
        assert queue.unfinished == 0
    finally:
        await queue.close()


def test_in_process_queue_refuses_past_its_bound(bench_factory: Callable[..., Bench]) -> None:
    """Admission past MAX_PENDING_JOBS raises Overloaded with a Retry-After hint."""
    from dispatcher.errors import Overloaded

    queue = InProcessQueue(bench_factory().executor, concurrency=1, max_pending=2)
    queue.admit()
    queue.admit()
    with pytest.raises(Overloaded) as caught:
        queue.admit()
    assert caught.value.retry_after_s >= 1
