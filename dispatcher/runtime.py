"""Builds the parts a service runs on from its settings, and closes them.

One HTTP session (when the process calls Vertex) and one Firestore client per
process, created at start-up and closed at shutdown;
the mode decides which store and queue are used.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from dispatcher.cache import FinishedJobCache
from dispatcher.events import CompletionEvents
from dispatcher.executor import JobExecutor
from dispatcher.lifecycle import JobManager, Lifecycle
from dispatcher.memory_store import MemoryJobStore
from dispatcher.metrics import JOBS, KEY_JOBS, build_registry
from dispatcher.pricing import PriceTable
from dispatcher.queue import InProcessQueue, JobQueue
from dispatcher.region_board import RegionBoard
from dispatcher.regions import PoolConfig, RegionPool, RoundRobin
from dispatcher.settings import Mode, Settings
from dispatcher.store import JobStore
from dispatcher.sweeper import Sweeper
from dispatcher.vertex import Credentials, RetryPolicy, VertexClient, http_session
from dispatcher.watcher import JobWatcher

# Pub/Sub push requests time out at the ack deadline; retries must end well before.
ACK_DEADLINE_SHARE = 0.8
SHUTDOWN_RELEASE_S = 3.0
# How often one batched read looks for jobs finished by other processes (long-poll).
WATCH_INTERVAL_S = 0.25


@dataclass(kw_only=True, slots=True)
class Runtime:
    """The live parts of one service process."""

    settings: Settings
    manager: JobManager
    executor: JobExecutor | None
    queue: JobQueue | None
    sweeper: Sweeper | None
    pool: RegionPool
    board: RegionBoard | None
    cache: FinishedJobCache
    round_robin: dict[str, RoundRobin]
    watcher: JobWatcher
    registry: CollectorRegistry


def build_store(settings: Settings) -> JobStore:
    """The store the mode asks for."""
    if settings.mode is Mode.MEMORY:
        return MemoryJobStore(max_jobs=settings.memory_max_jobs)
    from dispatcher.firestore_store import FirestoreJobStore

    assert settings.firestore_collection is not None and settings.firestore_database is not None
    return FirestoreJobStore.connect(
        project=settings.project,
        database=settings.firestore_database,
        collection=settings.firestore_collection,
    )


@contextlib.asynccontextmanager
async def completion_events(
    settings: Settings, manager: JobManager
) -> AsyncIterator[CompletionEvents | None]:
    """With RESULTS_TOPIC, the completion events, listening to the manager; else None."""
    if settings.results_topic is None:
        yield None
        return
    from dispatcher.pubsub import TopicPublisher

    events = CompletionEvents(
        manager,
        TopicPublisher(project=settings.project, topic=settings.results_topic),
        max_result_bytes=settings.results_event_result_bytes,
    )
    manager.on_finished(events.job_finished)
    try:
        yield events
    finally:
        await events.close()


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, *, executes: bool) -> AsyncIterator[Runtime]:
    """Create the parts, start the background work, and close it all on exit.

    Args:
        settings: The parsed settings.
        executes: Whether this process calls Vertex (the worker; the ingress in
            modes 1 and 2).
    """
    # Whatever is opened is closed, also when a later part fails to build.
    async with contextlib.AsyncExitStack() as resources:
        store = build_store(settings)
        resources.push_async_callback(store.close)
        manager = JobManager(
            store,
            Lifecycle(
                **settings.values_for(Lifecycle),
                completion_events=settings.results_topic is not None,
            ),
        )
        events = await resources.enter_async_context(completion_events(settings, manager))
        pool = RegionPool(PoolConfig.from_settings(settings))
        executor: JobExecutor | None = None
        queue: JobQueue | None = None
        sweeper: Sweeper | None = None
        board: RegionBoard | None = None
        all_regions = tuple(
            dict.fromkeys(r for model in settings.models.values() for r in model.regions)
        )
        if settings.mode is not Mode.MEMORY and settings.region_sync_s > 0:
            from dispatcher.firestore_store import FirestoreJobStore

            assert isinstance(store, FirestoreJobStore)
            # A mode-3 ingress calls no region: it only beats and counts (its own kind),
            # so that each ingress holds 1/N of the API keys' rates.
            board = RegionBoard(
                pool,
                store.region_board_store(
                    ttl_s=max(3600.0, 10 * settings.region_sync_s),
                    instances="instances" if executes else "ingress_instances",
                ),
                all_regions if executes else (),
                instance_id=secrets.token_hex(8),
                interval_s=settings.region_sync_s,
            )
        if executes:
            budget_s = (
                settings.push_ack_deadline_s * ACK_DEADLINE_SHARE
                if settings.mode is Mode.PUBSUB
                else float("inf")
            )
            http = await resources.enter_async_context(http_session())
            vertex = VertexClient(
                http,
                project=settings.project,
                pool=pool,
                policy=RetryPolicy(
                    **settings.values_for(RetryPolicy, prefix="vertex_"),
                    attempt_timeout_s=min(settings.vertex_timeout_s, budget_s),
                    budget_s=budget_s,
                ),
                endpoint=settings.vertex_api_endpoint,
                credentials=Credentials() if settings.vertex_sends_credentials else None,
            )
            executor = JobExecutor(
                manager,
                vertex,
                settings.models,
                requeue_delay_s=settings.requeue_delay_s,
                prices=PriceTable.load(settings.price_table_file)
                if settings.price_table_file
                else None,
            )
        if settings.mode is Mode.PUBSUB:
            from dispatcher.pubsub import PubSubQueue

            assert settings.pubsub_topic is not None
            pubsub = PubSubQueue(
                project=settings.project,
                topic=settings.pubsub_topic,
                interactive_topic=settings.interactive_topic,
            )
            queue = pubsub
            sweeper = Sweeper(manager, pubsub, interval_s=settings.sweep_interval_s, events=events)
        elif executor is not None:
            in_process = InProcessQueue(
                executor,
                pool=pool,
                regions=all_regions,
                max_pending=settings.max_pending_jobs,
                max_runs=settings.executor_concurrency or None,
            )
            queue = in_process
            if settings.mode is Mode.FIRESTORE:
                sweeper = Sweeper(
                    manager, in_process, interval_s=settings.sweep_interval_s, events=events
                )
        manager.on_finished(lambda job: JOBS.labels(job.status.value).inc())
        manager.on_finished(lambda job: KEY_JOBS.labels(job.owner or "", job.status.value).inc())
        watcher = JobWatcher(manager, interval_s=WATCH_INTERVAL_S)
        in_process_queue = queue if isinstance(queue, InProcessQueue) else None
        registry = build_registry(
            pool,
            queued=lambda: in_process_queue.queued if in_process_queue else 0,
            running=lambda: executor.running if executor else 0,
        )
        runtime = Runtime(
            settings=settings,
            manager=manager,
            executor=executor,
            queue=queue,
            sweeper=sweeper,
            pool=pool,
            board=board,
            cache=FinishedJobCache(settings.cache_max_jobs),
            round_robin={
                model_id: RoundRobin(model.regions) for model_id, model in settings.models.items()
            },
            watcher=watcher,
            registry=registry,
        )
        try:
            if queue is not None:
                await queue.start()
            if sweeper is not None:
                sweeper.start()
            if board is not None:
                board.start()
            watcher.start()
            yield runtime
        finally:
            await watcher.stop()
            if board is not None:
                await board.stop()
            if sweeper is not None:
                await sweeper.stop()
            if queue is not None:
                await queue.close()
            if executor is not None:
                # Runs cancelled by the server's shutdown hand their jobs back first.
                await executor.wait_idle(timeout_s=SHUTDOWN_RELEASE_S)
