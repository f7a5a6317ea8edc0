"""Pub/Sub: every Pub/Sub call of the project is in this file.

Topics: the jobs' (`PUBSUB_TOPIC`, mode 3), optionally the interactive jobs' beside it
(`INTERACTIVE_TOPIC`), and optionally the completion events' (`RESULTS_TOPIC`, any mode).

The ingress publishes one small message per job (`{"job_id": ...}`, the id also
as an attribute); the request itself stays in Firestore, so a message is far
below Pub/Sub's 10 MB limit and a republish by the recovery sweep needs nothing
but the id. The push envelope that Pub/Sub delivers to the worker is parsed here
too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # re-exported lazily

from dispatcher.errors import InvalidRequest, PublishFailed
from dispatcher.jobs import Job, is_job_id


class TopicPublisher:
    """Publishes messages to one topic (the jobs' and the completion events')."""

    def __init__(self, *, project: str, topic: str, timeout_s: float = 30.0) -> None:
        self._client = pubsub_v1.PublisherClient(
            # The default 10 ms: at 5 ms most batches held one message, each commit cost
            # a thread start and an RPC, and the accept path's p99 was no better (the
            # store's write decides it). Measured in BENCHMARKS.md (mode 3 accept path).
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.01)
        )
        self._topic = self._client.topic_path(project, topic)
        self._timeout_s = timeout_s

    async def publish(self, data: bytes, attributes: Mapping[str, str]) -> None:
        """Publish one message and wait for Pub/Sub to accept it.

        Raises:
            PublishFailed: it was not accepted.
        """
        try:
            future = self._client.publish(self._topic, data, **attributes)
            async with asyncio.timeout(self._timeout_s):
                await asyncio.wrap_future(future)
        except (google_exceptions.GoogleAPIError, TimeoutError) as exc:
            raise PublishFailed(f"could not publish to {self._topic}: {exc!r}") from exc

    async def close(self) -> None:
        """Flush pending publishes and stop the client's threads."""
        await asyncio.to_thread(self._client.stop)


class PubSubQueue:
    """Publishes jobs to a topic; the push-subscribed worker executes them.

    With an interactive topic, jobs of `priority=interactive` go there instead: its own
    push subscription delivers them however deep the batch topic's backlog is, and the
    worker's region slots then serve them before batch calls (`dispatcher.fairness`).
    """

    def __init__(
        self,
        *,
        project: str,
        topic: str,
        interactive_topic: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._publisher = TopicPublisher(project=project, topic=topic, timeout_s=timeout_s)
        self._interactive = (
            TopicPublisher(project=project, topic=interactive_topic, timeout_s=timeout_s)
            if interactive_topic
            else None
        )

    def admit(self) -> None:
        """Pub/Sub holds the backlog; nothing to reserve in this process."""

    def cancel_admission(self) -> None:
        """Nothing was reserved."""

    async def dispatch(self, job: Job) -> None:
        """Publish the job's id to its class's topic and wait for Pub/Sub to accept it.

        Raises:
            PublishFailed: it was not accepted.
        """
        publisher = self._publisher
        if self._interactive is not None and job.priority != "batch":
            publisher = self._interactive
        data = json.dumps({"job_id": job.job_id}).encode()
        await publisher.publish(data, {"job_id": job.job_id})

    async def redispatch(self, job: Job) -> None:
        """Publish again (the recovery sweep)."""
        await self.dispatch(job)

    async def start(self) -> None:
        """Nothing to start: the client connects on first publish."""

    async def close(self) -> None:
        """Flush pending publishes and stop the clients' threads."""
        await self._publisher.close()
        if self._interactive is not None:
            await self._interactive.close()


@dataclass(frozen=True, kw_only=True, slots=True)
class PushDelivery:
    """One message from a Pub/Sub push request."""

    job_id: str
    message_id: str
    delivery_attempt: int | None


def parse_push(envelope: Any) -> PushDelivery:
    """Read a wrapped push request body.

    Shape: `{"message": {"data": base64, "attributes": {...}, "messageId": ...},
    "subscription": ..., "deliveryAttempt": n}` (`deliveryAttempt` only with a
    dead-letter policy); https://cloud.google.com/pubsub/docs/push#receive_push.

    Raises:
        InvalidRequest: the envelope is not one the ingress could have produced.
    """
    if not isinstance(envelope, dict) or not isinstance(envelope.get("message"), dict):
        raise InvalidRequest("not a Pub/Sub push envelope: no 'message' object")
    message = envelope["message"]
    attributes = message.get("attributes") or {}
    job_id = attributes.get("job_id") if isinstance(attributes, dict) else None
    if job_id is None:
        try:
            payload = json.loads(base64.b64decode(message.get("data") or "", validate=True))
        except (binascii.Error, ValueError, TypeError):
            raise InvalidRequest("message.data is not base64-encoded JSON") from None
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
    if not isinstance(job_id, str) or not is_job_id(job_id):
        raise InvalidRequest("the message names no valid job_id")
    attempt = envelope.get("deliveryAttempt")
    return PushDelivery(
        job_id=job_id,
        message_id=str(message.get("messageId") or message.get("message_id") or ""),
        delivery_attempt=attempt if isinstance(attempt, int) and attempt > 0 else None,
    )
