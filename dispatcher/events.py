"""Completion events: one message per job that reaches a final state, on RESULTS_TOPIC.

The write that makes a job final also marks it `event_pending` with a sweep time (an
outbox in the record itself, `Lifecycle.completion_events`). The process that wrote it
publishes the event at once and then clears the mark; if it dies in between, or the
publish fails, the recovery sweep finds the job (its sweep time passes) and publishes it
then. So each final job's event is published at least once, and never before the record
says the job is final. Consumers should expect the odd duplicate (filter on `job_id`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from dispatcher.errors import DispatcherError
from dispatcher.jobs import Job, rfc3339
from dispatcher.lifecycle import JobManager

log = logging.getLogger(__name__)


class EventPublisher(Protocol):
    """Where events go (`pubsub.TopicPublisher`)."""

    async def publish(self, data: bytes, attributes: Mapping[str, str]) -> None:
        """Publish one message; raises PublishFailed."""
        ...

    async def close(self) -> None:
        """Flush and stop."""
        ...


def completion_event(job: Job, *, max_result_bytes: int) -> tuple[bytes, dict[str, str]]:
    """The event of a final job: its JSON body and the attributes to filter on.

    The response body is included only when its JSON fits in `max_result_bytes`.
    """
    labels = job.request.get("labels") if isinstance(job.request.get("labels"), dict) else {}
    batch_id = str(labels.get("batch_id", "")) if isinstance(labels, dict) else ""
    body: dict[str, Any] = {
        "job_id": job.job_id,
        "status": job.status.value,
        "owner": job.owner,
        "model": job.models_tried[-1] if job.models_tried else job.model,
        "region": job.region,
        "tier": job.tiers_tried[-1] if job.tiers_tried else job.tier,
        "usage": job.usage,
        "labels": labels,
        "batch_id": batch_id or None,
        "error": job.error.to_doc() if job.error else None,
        "attempts": job.attempts,
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        # The worker's webhook subscription signs with the key's secret (never in here).
        "webhook": {"url": job.webhook_url, "key": job.owner} if job.webhook_url else None,
    }
    if job.result is not None and max_result_bytes > 0:
        result = json.dumps(job.result, separators=(",", ":"))
        if len(result.encode()) <= max_result_bytes:
            body["result"] = job.result
    attributes = {"job_id": job.job_id, "status": job.status.value, "owner": job.owner or ""}
    if batch_id:
        attributes["batch_id"] = batch_id
    if job.webhook_url:  # lets the webhook subscription filter on `attributes:webhook`
        attributes["webhook"] = "true"
    return json.dumps(body, separators=(",", ":")).encode(), attributes


class CompletionEvents:
    """Publishes each final job's event, then clears its outbox mark."""

    def __init__(
        self, manager: JobManager, publisher: EventPublisher, *, max_result_bytes: int
    ) -> None:
        self._manager = manager
        self._publisher = publisher
        self._max_result_bytes = max_result_bytes
        self._sending: set[asyncio.Task[bool]] = set()

    def job_finished(self, job: Job) -> None:
        """The manager's listener: send the event in the background."""
        if not job.event_pending:
            return
        task = asyncio.get_running_loop().create_task(self.send(job))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def send(self, job: Job) -> bool:
        """Publish the job's event and clear its mark; whether it was sent.

        A failure is logged and left to the recovery sweep (the mark stays).
        """
        data, attributes = completion_event(job, max_result_bytes=self._max_result_bytes)
        try:
            await self._publisher.publish(data, attributes)
            await self._manager.event_sent(job.job_id)
        except DispatcherError as exc:
            log.warning(
                "completion event not sent; the sweep will retry",
                extra={"job_id": job.job_id, "reason": str(exc)[:300]},
            )
            return False
        return True

    async def close(self, timeout_s: float = 3.0) -> None:
        """Give events being sent a moment, then stop the publisher."""
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=timeout_s)
        await self._publisher.close()
