"""Signed webhooks through the Pub/Sub emulator: results topic -> push -> worker -> receiver."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.integration.conftest import Emulators
from tests.support.stack import Stack, create_push_subscription, prompt, unique

pytestmark = pytest.mark.integration
SECRET = "whsec_" + base64.b64encode(b"integration-webhook-secret-32by").decode()


@dataclass
class Receiver:
    """A loopback webhook receiver: answers the queued statuses (then 204), keeps requests."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def wait_for(self, count: int, *, status: int = 204, timeout_s: float = 60) -> None:
        """Until `count` requests were answered `status`."""
        deadline = time.monotonic() + timeout_s
        while sum(1 for *_, s in self.received if s == status) < count:
            assert time.monotonic() < deadline, f"got {[s for *_, s in self.received]}"
            time.sleep(0.1)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A running receiver on a free loopback port, stopped after the test."""
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with lock:
                status = state.statuses.pop(0) if state.statuses else 204
                headers = {k.lower(): v for k, v in self.headers.items()}
                state.received.append((headers, body, status))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def webhook_stack(stack_factory: Callable[..., Stack], emulators: Emulators) -> Callable[[], Stack]:
    """Mode 3 with RESULTS_TOPIC and a webhook push subscription to the worker's /webhooks."""

    def make() -> Stack:
        topic = unique("results")
        stack = stack_factory(
            "pubsub",
            RESULTS_TOPIC=topic,
            WEBHOOK_SECRET=SECRET,
            WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        )
        assert stack.worker is not None
        create_push_subscription(
            emulators.pubsub.env(),
            topic=topic,
            subscription=unique("webhooks"),
            endpoint=f"{stack.worker.url}/webhooks",
            min_retry_delay="1s",
            max_retry_delay="2s",
        )
        return stack

    return make


def _submit(stack: Stack, url: str) -> str:
    response = stack.submit({**prompt(unique("hook")), "webhook": {"url": url}})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def test_each_finished_job_gets_one_signed_post(
    webhook_stack: Callable[[], Stack], receiver: Receiver
) -> None:
    """Two finished jobs: one POST each, signed (verified by standardwebhooks), the
    webhook-id the job id and the body its completion event."""
    stack = webhook_stack()
    jobs = [_submit(stack, receiver.url) for _ in range(2)]
    for job_id in jobs:
        assert stack.wait(job_id)["status"] == "succeeded"
    receiver.wait_for(2)
    time.sleep(1.0)  # nothing more arrives
    assert len(receiver.received) == 2
    seen = set()
    for headers, body, _ in receiver.received:
        event = Webhook(SECRET).verify(body, headers)
        assert headers["webhook-id"] == event["job_id"]
        assert event["webhook"]["url"] == receiver.url
        assert event["status"] == "succeeded"
        seen.add(event["job_id"])
    assert seen == set(jobs)


def test_a_failing_receiver_is_retried_until_it_answers(
    webhook_stack: Callable[[], Stack], receiver: Receiver
) -> None:
    """A receiver answering 500 twice gets the webhook again (Pub/Sub redelivers) until
    it answers 2xx; each attempt is signed."""
    receiver.statuses = [500, 500]
    stack = webhook_stack()
    job_id = _submit(stack, receiver.url)
    stack.wait(job_id)
    receiver.wait_for(1)
    assert [s for *_, s in receiver.received] == [500, 500, 204]
    for headers, body, _ in receiver.received:
        assert json.loads(body)["job_id"] == job_id
        Webhook(SECRET).verify(body, headers)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://10.0.0.8/hook", "10.0.0.8 is a private address"),
        ("https://169.254.169.254/computeMetadata/v1/", "link-local"),
        ("http://hooks.example.com/hook", "must be https"),
    ],
)
def test_a_webhook_to_a_private_address_is_refused_at_submission(
    stack_factory: Callable[..., Stack], url: str, reason: str
) -> None:
    """400 INVALID_ARGUMENT naming webhook.url and why; no job is made."""
    stack = stack_factory("memory", WEBHOOK_ALLOW_HOSTS="127.0.0.1")
    response = stack.submit({**prompt("x"), "webhook": {"url": url}})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "webhook.url" in message and reason in message
