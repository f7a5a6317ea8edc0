"""Job execution with the memory store and the stand-in: the rules both services share.

The stand-in is served on a loopback port (no emulator needed), so these are
integration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from dispatcher.executor import JobExecutor, RunResult
from dispatcher.jobs import Job, JobStatus
from dispatcher.lifecycle import JobManager, Lifecycle
from dispatcher.memory_store import MemoryJobStore
from dispatcher.queue import SPARE_RUNS_MIN, InProcessQueue
from dispatcher.regions import PoolConfig, RegionPool
from dispatcher.settings import ModelConfig
from dispatcher.vertex import RetryPolicy, VertexClient
from tests.conftest import MODEL, REGIONS
from tests.support.standin import ServedStandin, serving_standin

pytestmark = pytest.mark.integration


@dataclass
class Bench:
    """An executor wired to a memory store and a stand-in served on loopback."""

    executor: JobExecutor
    manager: JobManager
    standin: ServedStandin
    pool: RegionPool

    async def stats(self) -> dict[str, Any]:
        return await self.standin.stats()


@pytest.fixture
async def bench_factory() -> AsyncIterator[Callable[..., Awaitable[Bench]]]:
    """Builds executors over a fresh stand-in configured by a doc; overridable limits."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            config: dict[str, Any] | None = None,
            *,
            max_deliveries: int = 3,
            max_retries: int = 1,
            lease_s: float = 30.0,
            pool_config: PoolConfig | None = None,
        ) -> Bench:
            standin = await stack.enter_async_context(serving_standin(config))
            manager = JobManager(
                MemoryJobStore(max_jobs=1000),
                Lifecycle(
                    lease_s=lease_s,
                    job_ttl_s=3600,
                    publish_grace_s=60,
                    max_delivery_attempts=max_deliveries,
                ),
            )
            pool = RegionPool(
                pool_config or PoolConfig(cooldown_initial_s=0.01, cooldown_max_s=0.02)
            )
            vertex = VertexClient(
                standin.session,
                project="p",
                pool=pool,
                policy=RetryPolicy(
                    max_retries=max_retries,
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
            return Bench(executor=executor, manager=manager, standin=standin, pool=pool)

        yield make


async def test_run_succeeds_and_records_result(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """A run calls Vertex once and stores its response as the result."""
    bench = await bench_factory()
    job = job_factory()
    await bench.manager.store.create(job)
    outcome = await bench.executor.run(job.job_id)
    assert outcome.result is RunResult.DONE
    done = await bench.manager.get(job.job_id)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert done.attempts == 1
    assert done.result is not None and "candidates" in done.result


async def test_duplicate_delivery_does_not_call_vertex_again(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """A second run of a finished job acknowledges without a Vertex call."""
    bench = await bench_factory()
    job = job_factory()
    await bench.manager.store.create(job)
    await bench.executor.run(job.job_id)
    again = await bench.executor.run(job.job_id)
    assert again.result is RunResult.DONE
    assert (await bench.stats())["total_calls"] == 1


async def test_concurrent_duplicates_call_vertex_once(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """Two runs of the same job at once: one calls Vertex, the other is told to retry."""
    bench = await bench_factory({"default": {"latency_s": 0.2}})
    job = job_factory()
    await bench.manager.store.create(job)
    first, second = await asyncio.gather(
        bench.executor.run(job.job_id), bench.executor.run(job.job_id)
    )
    assert sorted(o.result.value for o in (first, second)) == ["done", "retry"]
    assert (await bench.stats())["total_calls"] == 1


async def test_permanent_error_fails_once(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """A 400 fails the job at once with Vertex's code, status and message."""
    bench = await bench_factory({"default": {"status": 400}})
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
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """Spent retries release the job; at MAX_DELIVERY_ATTEMPTS it fails with the last error."""
    bench = await bench_factory({"default": {"status": 503}}, max_deliveries=2, max_retries=1)
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
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """Pub/Sub's deliveryAttempt at the limit makes a transient failure final."""
    bench = await bench_factory({"default": {"status": 503}}, max_deliveries=5, max_retries=0)
    job = job_factory()
    await bench.manager.store.create(job)
    outcome = await bench.executor.run(job.job_id, delivery_attempt=5)
    assert outcome.result is RunResult.DONE
    failed = await bench.manager.get(job.job_id)
    assert failed is not None and failed.status is JobStatus.FAILED


async def test_cached_content_runs_only_in_its_region(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """A request naming a context cache runs in the cache's region, whatever was assigned."""
    bench = await bench_factory()
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
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """In modes 1 and 2 a retried job is put back on the queue and finishes."""
    every_region_fails_once = {"regions": {region: {"script": [503]} for region in REGIONS}}
    bench = await bench_factory(every_region_fails_once, max_deliveries=5, max_retries=0)
    queue = InProcessQueue(bench.executor, pool=bench.pool, regions=REGIONS, max_pending=10)
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


async def test_in_process_queue_refuses_past_its_bound(
    bench_factory: Callable[..., Awaitable[Bench]],
) -> None:
    """Admission past MAX_PENDING_JOBS raises Overloaded with a Retry-After hint."""
    from dispatcher.errors import Overloaded

    bench = await bench_factory()
    queue = InProcessQueue(bench.executor, pool=bench.pool, regions=REGIONS, max_pending=2)
    queue.admit()
    queue.admit()
    with pytest.raises(Overloaded) as caught:
        queue.admit()
    assert caught.value.retry_after_s >= 1


async def _run_all(bench: Bench, queue: InProcessQueue, jobs: list[Job]) -> int:
    """Queue the jobs, wait until all have finished; the most runs seen under way at once."""
    for job in jobs:
        await bench.manager.store.create(job)
        queue.admit()
        await queue.dispatch(job)
    most_runs = 0
    while queue.unfinished:
        most_runs = max(most_runs, queue.runs)
        await asyncio.sleep(0.005)
    return most_runs


async def test_in_process_queue_follows_the_regions_limits_past_any_constant(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """With regions taking 100 calls each, 300 slow calls are in flight at once, no fewer."""
    # Calls of 3 s: long enough that all 300 start before the first ends, even on a
    # loaded CI machine (at 0.5 s a slow pump saw the first calls end first). Retries
    # are not what this checks: on a machine loaded enough for an attempt to time
    # out, the stand-in counts the abandoned call too, so the peak is "at least".
    bench = await bench_factory(
        {"default": {"latency_s": 3.0, "capacity": 100}},
        pool_config=PoolConfig(concurrency_initial=100, concurrency_max=100),
    )
    queue = InProcessQueue(bench.executor, pool=bench.pool, regions=REGIONS, max_pending=1000)
    jobs = [job_factory() for _ in range(300)]
    await queue.start()
    try:
        await _run_all(bench, queue, jobs)
    finally:
        await queue.close()
    stats = await bench.stats()
    assert sum(r["max_in_flight"] for r in stats["regions"].values()) >= 300
    finished = [await bench.manager.get(job.job_id) for job in jobs]
    assert all(job is not None and job.status is JobStatus.SUCCEEDED for job in finished)


async def test_in_process_queue_starts_few_more_runs_than_the_regions_take(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """Jobs past the regions' capacity wait queued, not as runs holding a lease."""
    bench = await bench_factory(
        {"default": {"latency_s": 0.05}},
        pool_config=PoolConfig(concurrency_initial=2, concurrency_max=2),
    )
    queue = InProcessQueue(bench.executor, pool=bench.pool, regions=REGIONS, max_pending=1000)
    await queue.start()
    try:
        most_runs = await _run_all(bench, queue, [job_factory() for _ in range(60)])
    finally:
        await queue.close()
    capacity = 2 * len(REGIONS)
    assert capacity < most_runs <= capacity + SPARE_RUNS_MIN


async def test_in_process_queue_keeps_an_explicit_cap(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """EXECUTOR_CONCURRENCY, when set, caps the runs under way whatever the regions take."""
    bench = await bench_factory({"default": {"latency_s": 0.05}})
    queue = InProcessQueue(
        bench.executor, pool=bench.pool, regions=REGIONS, max_pending=1000, max_runs=3
    )
    await queue.start()
    try:
        most_runs = await _run_all(bench, queue, [job_factory() for _ in range(30)])
    finally:
        await queue.close()
    assert most_runs == 3
    assert (await bench.stats())["total_calls"] == 30


async def test_lease_is_renewed_while_the_call_lasts(
    bench_factory: Callable[..., Awaitable[Bench]], job_factory: Callable[..., Job]
) -> None:
    """A call longer than the lease keeps it (renewed every third), so no second run starts."""
    bench = await bench_factory({"default": {"latency_s": 1.0}}, lease_s=0.3)
    job = job_factory()
    await bench.manager.store.create(job)
    first = asyncio.create_task(bench.executor.run(job.job_id))
    await asyncio.sleep(0.7)  # more than two lease lengths into the call
    running = await bench.manager.get(job.job_id)
    assert running is not None and running.status is JobStatus.RUNNING
    assert running.lease_until is not None and running.lease_until > datetime.now(UTC)
    second = await bench.executor.run(job.job_id)
    assert second.result is RunResult.RETRY
    assert (await first).result is RunResult.DONE
    done = await bench.manager.get(job.job_id)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert (await bench.stats())["total_calls"] == 1
