"""infra/pubsub.sh run for real against the Pub/Sub emulator, checked with the admin clients."""

from __future__ import annotations

import base64
import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # re-exported lazily
from google.pubsub_v1.types import Subscription

from tests.support.processes import base_child_env, free_port
from tests.support.stack import PROJECT, ROOT, unique

if TYPE_CHECKING:
    from tests.integration.conftest import Emulators

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "infra" / "pubsub.sh"
INVOKER = f"dispatcher-push-invoker@{PROJECT}.iam.gserviceaccount.com"


@dataclass
class Names:
    """Fresh resource names for one test (the emulator is shared by the session)."""

    topic: str
    subscription: str
    dead_letter_topic: str

    def path(self, kind: str, name: str) -> str:
        """The full resource name, e.g. projects/P/topics/T."""
        return f"projects/{PROJECT}/{kind}/{name}"


@pytest.fixture
def names() -> Names:
    """Names no other test uses."""
    return Names(topic=unique("jobs"), subscription=unique("push"), dead_letter_topic=unique("dlt"))


@pytest.fixture
def run_pubsub_script(
    emulators: Emulators, names: Names, tmp_path: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs infra/pubsub.sh for the test's names against the emulator; asserts it succeeded."""
    env = base_child_env(
        {
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://{emulators.pubsub.host_port}/",
            "CLOUDSDK_CORE_PROJECT": PROJECT,
            # A config directory of its own: nothing from the developer's gcloud
            # setup (account, project, endpoints) can leak in.
            "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        }
    )

    def run(*options: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(SCRIPT), "--project", PROJECT, "--topic", names.topic,
             "--subscription", names.subscription, *options],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done

    return run


@pytest.fixture
def subscriber(emulators: Emulators, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real SubscriberClient talking to the emulator."""
    for name, value in emulators.pubsub.env().items():
        monkeypatch.setenv(name, value)
    with pubsub_v1.SubscriberClient() as client:
        yield client


@pytest.fixture
def publisher(emulators: Emulators, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real PublisherClient talking to the emulator."""
    for name, value in emulators.pubsub.env().items():
        monkeypatch.setenv(name, value)
    with pubsub_v1.PublisherClient() as client:
        yield client


@dataclass
class Endpoint:
    """A loopback HTTP server standing in for the worker: records each push, answers `status`."""

    url: str = ""
    received: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    status: int = 204


@pytest.fixture
def push_endpoint() -> Iterator[Endpoint]:
    """A push endpoint on a free loopback port, stopped after the test."""
    endpoint = Endpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            endpoint.received.put(json.loads(body))
            self.send_response(endpoint.status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint.url = f"http://127.0.0.1:{server.server_port}/"
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


FULL_OPTIONS = ("--ack-deadline", "120", "--min-retry-delay", "1s", "--max-retry-delay", "30s",
                "--max-delivery-attempts", "5")  # fmt: skip


def test_creates_topic_and_push_subscription(
    run_pubsub_script: Callable[..., subprocess.CompletedProcess[str]],
    subscriber: Any,
    publisher: Any,
    names: Names,
) -> None:
    """The topic and the push subscription exist with the endpoint, deadline and policies."""
    endpoint = f"http://127.0.0.1:{free_port()}/"
    run_pubsub_script(
        "--push-endpoint", endpoint, "--dead-letter-topic", names.dead_letter_topic, *FULL_OPTIONS
    )
    publisher.get_topic(topic=names.path("topics", names.topic))
    publisher.get_topic(topic=names.path("topics", names.dead_letter_topic))
    push = subscriber.get_subscription(subscription=names.path("subscriptions", names.subscription))
    assert push.topic == names.path("topics", names.topic)
    assert push.push_config.push_endpoint == endpoint
    assert push.ack_deadline_seconds == 120
    assert push.dead_letter_policy.dead_letter_topic == names.path(
        "topics", names.dead_letter_topic
    )
    assert push.dead_letter_policy.max_delivery_attempts == 5
    assert push.retry_policy.minimum_backoff.total_seconds() == 1
    assert push.retry_policy.maximum_backoff.total_seconds() == 30
    kept = subscriber.get_subscription(
        subscription=names.path("subscriptions", f"{names.dead_letter_topic}-sub")
    )
    assert kept.topic == names.path("topics", names.dead_letter_topic)
    assert not kept.push_config.push_endpoint


def test_running_twice_changes_nothing(
    run_pubsub_script: Callable[..., subprocess.CompletedProcess[str]],
    subscriber: Any,
    names: Names,
) -> None:
    """A second run with the same options succeeds and leaves the subscription as it was."""
    options = ("--push-endpoint", f"http://127.0.0.1:{free_port()}/",
               "--dead-letter-topic", names.dead_letter_topic, *FULL_OPTIONS)  # fmt: skip
    run_pubsub_script(*options)
    path = names.path("subscriptions", names.subscription)
    first = Subscription.to_dict(subscriber.get_subscription(subscription=path))
    second_run = run_pubsub_script(*options)
    assert f"topic {names.topic} exists" in second_run.stderr
    assert Subscription.to_dict(subscriber.get_subscription(subscription=path)) == first


def test_second_run_applies_changed_options(
    run_pubsub_script: Callable[..., subprocess.CompletedProcess[str]],
    subscriber: Any,
    names: Names,
) -> None:
    """Running again with other values updates the existing subscription, OIDC included."""
    run_pubsub_script("--push-endpoint", f"http://127.0.0.1:{free_port()}/", "--ack-deadline", "60")
    moved = f"http://127.0.0.1:{free_port()}/"
    run_pubsub_script(
        "--push-endpoint", moved, "--ack-deadline", "300",
        "--push-service-account", INVOKER, "--audience", "https://worker.example",
    )  # fmt: skip
    push = subscriber.get_subscription(subscription=names.path("subscriptions", names.subscription))
    assert push.push_config.push_endpoint == moved
    assert push.ack_deadline_seconds == 300
    assert push.push_config.oidc_token.service_account_email == INVOKER
    assert push.push_config.oidc_token.audience == "https://worker.example"


def test_published_job_is_pushed_to_the_endpoint(
    run_pubsub_script: Callable[..., subprocess.CompletedProcess[str]],
    publisher: Any,
    push_endpoint: Endpoint,
    names: Names,
) -> None:
    """A message on the topic arrives at the endpoint as a wrapped push envelope."""
    run_pubsub_script(
        "--push-endpoint", push_endpoint.url, "--dead-letter-topic", names.dead_letter_topic,
        *FULL_OPTIONS,
    )  # fmt: skip
    publisher.publish(names.path("topics", names.topic), b'{"job_id": "job-1"}').result(timeout=30)
    envelope = push_endpoint.received.get(timeout=60)
    assert envelope["subscription"] == names.path("subscriptions", names.subscription)
    assert json.loads(base64.b64decode(envelope["message"]["data"])) == {"job_id": "job-1"}
    # Pub/Sub adds deliveryAttempt when there is a dead-letter policy; the emulator
    # (0.8.20) leaves it out even then, so the worker must not depend on it.
    assert envelope.get("deliveryAttempt", 1) == 1


def test_refused_job_ends_in_the_dead_letter_subscription(
    run_pubsub_script: Callable[..., subprocess.CompletedProcess[str]],
    publisher: Any,
    subscriber: Any,
    push_endpoint: Endpoint,
    names: Names,
) -> None:
    """After max-delivery-attempts refusals the message waits in the dead-letter subscription."""
    push_endpoint.status = 500
    run_pubsub_script(
        "--push-endpoint", push_endpoint.url, "--dead-letter-topic", names.dead_letter_topic,
        "--max-delivery-attempts", "5", "--min-retry-delay", "0s", "--max-retry-delay", "1s",
    )  # fmt: skip
    publisher.publish(names.path("topics", names.topic), b'{"job_id": "job-2"}').result(timeout=30)
    for _ in range(5):
        push_endpoint.received.get(timeout=30)
    kept = names.path("subscriptions", f"{names.dead_letter_topic}-sub")
    deadline = time.monotonic() + 60
    messages: list[bytes] = []
    while not messages and time.monotonic() < deadline:
        pulled = subscriber.pull(subscription=kept, max_messages=1, timeout=10)
        messages = [m.message.data for m in pulled.received_messages]
    assert messages == [b'{"job_id": "job-2"}']
