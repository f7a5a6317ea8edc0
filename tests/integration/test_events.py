"""Completion events on RESULTS_TOPIC, through the Pub/Sub emulator (modes 2 and 3)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Emulators
from tests.support.stack import PROJECT, Stack, prompt, unique

pytestmark = pytest.mark.integration


class Topic:
    """A topic and a pull subscription on the emulator, over its REST API."""

    def __init__(self, emulators: Emulators, name: str, http: httpx.Client) -> None:
        self.name = name
        self._base = f"http://{emulators.pubsub.host_port}/v1/projects/{PROJECT}"
        self._subscription = unique("events")
        self._http = http

    def create(self) -> Topic:
        assert self._http.put(f"{self._base}/topics/{self.name}").status_code == 200
        created = self._http.put(
            f"{self._base}/subscriptions/{self._subscription}",
            json={"topic": f"projects/{PROJECT}/topics/{self.name}", "ackDeadlineSeconds": 60},
        )
        assert created.status_code == 200, created.text
        return self

    def pull(self, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
        """At least `count` messages (their body and attributes), acknowledged."""
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            pulled = self._http.post(
                f"{self._base}/subscriptions/{self._subscription}:pull",
                json={"maxMessages": 100, "returnImmediately": True},
            ).json()
            received = pulled.get("receivedMessages", [])
            if received:
                self._http.post(
                    f"{self._base}/subscriptions/{self._subscription}:acknowledge",
                    json={"ackIds": [m["ackId"] for m in received]},
                )
            for item in received:
                message = item["message"]
                messages.append(
                    {
                        "body": json.loads(base64.b64decode(message["data"])),
                        "attributes": message.get("attributes", {}),
                    }
                )
            if not received:
                time.sleep(0.2)
        return messages


@pytest.fixture
def topic_factory(emulators: Emulators) -> Iterator[Callable[[str], Topic]]:
    """Makes topics (with a pull subscription) on the emulator; closes their client after."""
    with httpx.Client(timeout=10) as http:
        yield lambda name: Topic(emulators, name, http)


@pytest.mark.parametrize("mode", ["firestore", "pubsub"])
def test_each_final_job_publishes_one_event(
    stack_factory: Callable[..., Stack],
    emulators: Emulators,
    topic_factory: Callable[[str], Topic],
    mode: str,
) -> None:
    """A job that succeeds and one that fails each publish an event with the record's
    outcome and filterable attributes, after the record is final."""
    topic = topic_factory(unique("results")).create()
    # Mode 3 has the emulator's address already; mode 2 needs it for the events alone.
    emulator = emulators.pubsub.env() if mode == "firestore" else {}
    stack = stack_factory(
        mode, RESULTS_TOPIC=topic.name, RESULTS_EVENT_RESULT_BYTES="100000", **emulator
    )
    ok = stack.submit_ok(unique("evt"))
    views = {ok: stack.wait(ok)}
    stack.configure_standin({"default": {"status": 400}})
    bad = stack.submit_ok(unique("evt"))
    views[bad] = stack.wait(bad)
    events = {m["body"]["job_id"]: m for m in topic.pull(2)}
    assert set(events) == {ok, bad}
    for job_id, view in views.items():
        event = events[job_id]
        assert event["body"]["status"] == view["status"]
        assert event["attributes"]["status"] == view["status"]
        assert event["attributes"]["job_id"] == job_id
        assert event["body"]["updated_at"] == view["updated_at"]
    assert events[ok]["body"]["result"] == views[ok]["result"]
    assert events[ok]["body"]["usage"] == views[ok]["usage"]
    assert events[bad]["body"]["error"]["code"] == 400
    assert "result" not in events[bad]["body"]


def test_an_event_that_could_not_be_published_is_sent_by_the_sweep(
    stack_factory: Callable[..., Stack],
    emulators: Emulators,
    topic_factory: Callable[[str], Topic],
) -> None:
    """While the results topic is missing, publishing fails; the record keeps the event
    owed, and once the topic exists the recovery sweep publishes it."""
    topic = topic_factory(unique("late-results"))
    stack = stack_factory(
        "firestore",
        RESULTS_TOPIC=topic.name,
        SWEEP_INTERVAL_S="0.5",
        PUBLISH_GRACE_S="1",
        **emulators.pubsub.env(),
    )
    job_id = stack.submit_ok(unique("owed"))
    assert stack.wait(job_id)["status"] == "succeeded"
    time.sleep(1.5)  # the first publish has failed by now (no topic)
    topic.create()
    [event] = topic.pull(1)
    assert event["body"]["job_id"] == job_id
    assert event["body"]["status"] == "succeeded"


def test_events_carry_no_body_unless_asked(
    stack_factory: Callable[..., Stack],
    emulators: Emulators,
    topic_factory: Callable[[str], Topic],
) -> None:
    """With the default RESULTS_EVENT_RESULT_BYTES (0) an event has no response body, and
    labels and a batch_id label come through (as an attribute too)."""
    topic = topic_factory(unique("results")).create()
    stack = stack_factory("firestore", RESULTS_TOPIC=topic.name, **emulators.pubsub.env())
    response = stack.submit({**prompt("x"), "labels": {"batch_id": "b-7", "team": "a"}})
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    stack.wait(job_id)
    [event] = topic.pull(1)
    assert "result" not in event["body"]
    assert event["body"]["labels"] == {"batch_id": "b-7", "team": "a"}
    assert event["attributes"]["batch_id"] == "b-7"
