"""Nothing lost, nothing wasted: failover, capacity, crashes, duplicates, soak.

Real processes, the emulators, the Vertex stand-in. Figures the issue asks to
report (429 share, lost jobs, duplicate calls) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dispatcher.firestore_store import FirestoreJobStore
from dispatcher.jobs import new_job_id
from dispatcher.lifecycle import JobManager, Lifecycle
from tests.support.stack import REGIONS, TERMINAL, Stack, prompt, unique

pytestmark = pytest.mark.integration
DEAD = REGIONS[0]


def submit_many(stack: Stack, texts: list[str], threads: int = 16) -> list[str]:
    """Submit prompts concurrently; every one must be accepted."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(stack.submit_ok, texts))


def wait_all(stack: Stack, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll until every job is terminal or the timeout passes; returns the last views."""
    deadline = time.monotonic() + timeout
    views: dict[str, dict[str, Any]] = {}
    open_ids = list(job_ids)
    while open_ids and time.monotonic() < deadline:
        still_open = []
        for job_id in open_ids:
            view = stack.job(job_id)
            views[job_id] = view
            if view["status"] not in TERMINAL:
                still_open.append(job_id)
        open_ids = still_open
        if open_ids:
            time.sleep(0.2)
    return views


def successes_by_text(stack: Stack) -> Counter[str]:
    """How many calls per prompt the stand-in answered 200."""
    calls = stack.http.get(f"{stack.standin.url}/_standin/calls").json()
    return Counter(call["text"] for call in calls if call["status"] == 200)


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_dead_region_gets_only_probes(stack_factory: Callable[..., Stack], mode: str) -> None:
    """With one region answering only 503, every job succeeds elsewhere; it gets few calls."""
    stack = stack_factory(
        mode,
        standin={"regions": {DEAD: {"status": 503}}, "default": {"latency_s": 0.05}},
        REGION_COOLDOWN_INITIAL_S="1",
        REGION_COOLDOWN_MAX_S="8",
    )
    texts = [unique("dead") for _ in range(60)]
    job_ids = [stack.submit_ok(text) for text in texts]
    views = wait_all(stack, job_ids, timeout=90)
    assert [v["status"] for v in views.values()] == ["succeeded"] * 60
    assert all(v["region"] != DEAD for v in views.values())
    dead_calls = stack.standin_stats()["regions"][DEAD]["calls"]
    assigned_dead = sum(1 for v in views.values() if DEAD in v["regions_tried"])
    print(f"\n[{mode}] dead region: {dead_calls} calls for 60 jobs ({assigned_dead} touched it)")
    assert dead_calls <= 8


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_capacity_limited_regions_serve_every_job(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """Regions that answer 429 past a capacity of 3 still serve all jobs; the 429 share is shown."""
    stack = stack_factory(
        mode,
        standin={"default": {"capacity": 3, "latency_s": 0.2}},
        REGION_CONCURRENCY_INITIAL="8",
    )
    job_ids = submit_many(stack, [unique("cap") for _ in range(120)])
    views = wait_all(stack, job_ids, timeout=120)
    assert Counter(v["status"] for v in views.values()) == {"succeeded": 120}
    stats = stack.standin_stats()
    calls = stats["total_calls"]
    too_many = sum(r["by_status"].get("429", 0) for r in stats["regions"].values())
    print(
        f"\n[{mode}] capacity 3 x 3 regions: {calls} calls for 120 jobs, {too_many / calls:.1%} 429"
    )
    assert all(r["max_in_flight"] <= 3 for r in stats["regions"].values())


def test_worker_killed_mid_call_still_finishes(stack_factory: Callable[..., Stack]) -> None:
    """SIGKILL of the worker during a slow Vertex call: the job ends succeeded, ≤ 1 extra call."""
    stack = stack_factory("pubsub", standin={"default": {"latency_s": 4}}, LEASE_S="3")
    assert stack.worker is not None
    text = unique("killed")
    job_id = stack.submit_ok(text)
    deadline = time.monotonic() + 30
    while stack.standin_stats()["total_calls"] == 0:
        assert time.monotonic() < deadline, "the worker never called Vertex"
        time.sleep(0.05)
    stack.worker.kill()
    stack.configure_standin({"default": {"latency_s": 0.1}})
    stack.worker.restart()
    view = stack.wait(job_id, timeout=90)
    assert view["status"] == "succeeded"
    calls = stack.standin_stats()["calls_by_text"][text]
    print(f"\nworker SIGKILL mid-call: {calls} Vertex calls for the job")
    assert calls <= 2


def test_sigterm_releases_the_job_within_the_grace(stack_factory: Callable[..., Stack]) -> None:
    """SIGTERM during a long call: the worker exits within 10 s and the job is not lost."""
    stack = stack_factory("pubsub", standin={"default": {"latency_s": 60}}, LEASE_S="30")
    assert stack.worker is not None
    text = unique("sigterm")
    job_id = stack.submit_ok(text)
    deadline = time.monotonic() + 30
    while stack.job(job_id)["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    stack.worker.terminate(timeout=15)
    took = time.monotonic() - started
    print(f"\nworker SIGTERM with a call in flight: exited in {took:.1f} s")
    assert took < 10
    assert stack.job(job_id)["status"] == "pending"  # released, not held by a dead lease
    stack.configure_standin({"default": {"latency_s": 0.05}})
    stack.worker.restart()
    assert stack.wait(job_id, timeout=60)["status"] == "succeeded"


def test_job_stored_but_never_published_still_finishes(
    stack_factory: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record written without a publish (the ingress died in between) is republished and run."""
    stack = stack_factory("pubsub", SWEEP_INTERVAL_S="0.5", PUBLISH_GRACE_S="1")
    for key in ("FIRESTORE_EMULATOR_HOST",):
        monkeypatch.setenv(key, stack.env[key])
    text = unique("orphan")

    async def write_like_a_dying_ingress() -> str:
        # Exactly what the ingress does before it publishes: the project's own store code.
        store = FirestoreJobStore.connect(
            project=stack.env["GOOGLE_CLOUD_PROJECT"],
            database="(default)",
            collection=stack.env["FIRESTORE_COLLECTION"],
        )
        manager = JobManager(
            store, Lifecycle(lease_s=60, job_ttl_s=3600, publish_grace_s=1, max_delivery_attempts=5)
        )
        job = manager.new_job(
            job_id=new_job_id(),
            model=stack.env["MODEL_ID"],
            region=REGIONS[1],
            request=prompt(text),
        )
        await store.create(job)
        await store.close()
        return job.job_id

    job_id = asyncio.run(write_like_a_dying_ingress())
    view = stack.wait(job_id, timeout=60)
    assert view["status"] == "succeeded"
    assert stack.standin_stats()["calls_by_text"][text] == 1


def test_three_mib_response_round_trips(stack_factory: Callable[..., Stack]) -> None:
    """A 3 MiB Vertex response is stored in Firestore and returned whole."""
    size = 3 * 1024 * 1024
    stack = stack_factory("pubsub", standin={"default": {"response_bytes": size}})
    view = stack.wait(stack.submit_ok(unique("big")), timeout=60)
    assert view["status"] == "succeeded"
    text = view["result"]["candidates"][0]["content"]["parts"][0]["text"]
    assert len(text) >= size - 1024
    assert set(text[-100:]) == {"x"}


@pytest.mark.timeout(600)
def test_soak_mode3_with_faults_and_a_worker_restart(stack_factory: Callable[..., Stack]) -> None:
    """2,000 jobs through mode 3 with 429s, 503s and a worker restart: none lost, few duplicates."""
    jobs = 2000
    stack = stack_factory(
        "pubsub",
        standin={
            "default": {"capacity": 24, "latency_s": 0.05},
            "regions": {
                REGIONS[1]: {"capacity": 24, "latency_s": 0.05, "script": [503] * 40},
                REGIONS[2]: {"capacity": 24, "latency_s": 0.05, "script": [429] * 40},
            },
        },
        LEASE_S="5",
        SWEEP_INTERVAL_S="2",
        PUBLISH_GRACE_S="10",
    )
    assert stack.worker is not None
    texts = [unique("soak") for _ in range(jobs)]
    with ThreadPoolExecutor(1) as background:
        submitted = background.submit(submit_many, stack, texts, 24)
        while stack.standin_stats()["total_calls"] < jobs // 3:
            time.sleep(0.1)
        stack.worker.kill()
        stack.worker.restart()
        job_ids = submitted.result()
    views = wait_all(stack, job_ids, timeout=400)
    statuses = Counter(v["status"] for v in views.values())
    lost = sum(n for status, n in statuses.items() if status not in TERMINAL)
    successes = successes_by_text(stack)
    duplicates = sum(n - 1 for n in successes.values() if n > 1)
    stats = stack.standin_stats()
    by_status: Counter[str] = Counter()
    for region in stats["regions"].values():
        by_status.update(region["by_status"])
    print(
        f"\nsoak: {jobs} jobs, statuses {dict(statuses)}, lost {lost}, "
        f"duplicate Vertex calls {duplicates}, calls by status {dict(by_status)}"
    )
    assert lost == 0
    assert statuses["succeeded"] == jobs


def test_backpressure_answers_429_with_retry_after(stack_factory: Callable[..., Stack]) -> None:
    """Past MAX_PENDING_JOBS unfinished jobs: 429 with Retry-After, then room again."""
    stack = stack_factory("memory", standin={"default": {"latency_s": 1.5}}, MAX_PENDING_JOBS="2")
    first = [stack.submit_ok(unique("held")) for _ in range(2)]
    refused = stack.submit(prompt("one too many"))
    assert refused.status_code == 429
    assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert int(refused.headers["retry-after"]) >= 1
    for job_id in first:
        assert stack.wait(job_id)["status"] == "succeeded"
    assert stack.submit(prompt("room again")).status_code == 202


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_session_jobs_stay_in_one_region(stack_factory: Callable[..., Stack], mode: str) -> None:
    """Jobs with the same X-Session-Id are assigned, and served by, one region."""
    stack = stack_factory(mode)
    job_ids = [
        stack.submit_ok(unique("chat"), headers={"X-Session-Id": "user-7"}) for _ in range(5)
    ]
    regions = {stack.wait(job_id)["region"] for job_id in job_ids}
    assert len(regions) == 1
