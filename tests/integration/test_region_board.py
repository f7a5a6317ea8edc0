"""Two worker processes share region health through the Firestore emulator."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Emulators, mode_env
from tests.support.processes import ServiceProcess
from tests.support.stack import PROJECT, REGIONS, Stack, service_env, start_standin, unique

DEAD = REGIONS[0]


def push(worker: ServiceProcess, job_id: str) -> httpx.Response:
    """POST one push envelope for `job_id` to a worker, as Pub/Sub would."""
    data = base64.b64encode(json.dumps({"job_id": job_id}).encode()).decode()
    message = {"data": data, "attributes": {"job_id": job_id}, "messageId": job_id}
    envelope = {"message": message, "subscription": f"projects/{PROJECT}/subscriptions/s"}
    return httpx.post(f"{worker.url}/", json=envelope, timeout=30)


def dead_region_calls(stack: Stack) -> int:
    """Calls the stand-in has answered in the dead region."""
    return int(stack.standin_stats()["regions"].get(DEAD, {}).get("calls", 0))


@pytest.mark.parametrize(("sync_s", "shared"), [("0.3", True), ("0", False)], ids=["on", "off"])
def test_a_region_one_worker_saw_fail_is_avoided_by_the_other(
    emulators: Emulators, tmp_path: Path, sync_s: str, shared: bool
) -> None:
    """After worker A's breaker opens, worker B sends the dead region nothing (only when shared)."""
    standin = start_standin(tmp_path, {"regions": {DEAD: {"status": 503}}})
    env = service_env(
        standin,
        **mode_env("pubsub", emulators),
        REGION_SYNC_S=sync_s,
        REGION_COOLDOWN_INITIAL_S="60",
        REGION_COOLDOWN_MAX_S="60",
    )
    topic = (
        f"http://{emulators.pubsub.host_port}/v1/projects/{PROJECT}/topics/{env['PUBSUB_TOPIC']}"
    )
    httpx.put(topic, json={}).raise_for_status()  # published messages wait there, unread
    stack = Stack(standin=standin, ingresses=[], env=env)
    workers: list[ServiceProcess] = []
    try:
        for _ in range(2):
            workers.append(ServiceProcess.start("worker", env, log_dir=tmp_path))
        first, second = workers
        stack.ingresses.append(ServiceProcess.start("ingress", env, log_dir=tmp_path))
        for job_id in [stack.submit_ok(unique("a")) for _ in range(len(REGIONS))]:
            assert push(first, job_id).status_code == 200
        seen_by_first = dead_region_calls(stack)
        assert seen_by_first == 1  # the first 503 opened A's breaker for 60 s
        time.sleep(1.5)  # a few sync intervals
        for job_id in [stack.submit_ok(unique("b")) for _ in range(2 * len(REGIONS))]:
            assert push(second, job_id).status_code == 200
            assert stack.job(job_id)["status"] == "succeeded"
        from_second = dead_region_calls(stack) - seen_by_first
        assert (from_second == 0) if shared else (from_second >= 1)
    finally:
        stack.close()
        for worker in workers:
            worker.terminate()
