"""Pub/Sub push envelopes: read what Pub/Sub sends, refuse what it never would."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from dispatcher.errors import InvalidRequest
from dispatcher.pubsub import parse_push

JOB_ID = "A" * 22


def envelope(data: Any = None, attributes: Any = None, **top: Any) -> dict[str, Any]:
    payload = json.dumps({"job_id": JOB_ID} if data is None else data).encode()
    message: dict[str, Any] = {
        "data": base64.b64encode(payload).decode(),
        "messageId": "42",
        "message_id": "42",
        "publishTime": "2026-01-01T00:00:00Z",
    }
    if attributes is not None:
        message["attributes"] = attributes
    return {"message": message, "subscription": "projects/p/subscriptions/s", **top}


def test_reads_job_id_from_data() -> None:
    """The job id comes from the base64 JSON data."""
    delivery = parse_push(envelope())
    assert delivery.job_id == JOB_ID
    assert delivery.message_id == "42"
    assert delivery.delivery_attempt is None


def test_reads_delivery_attempt_when_present() -> None:
    """deliveryAttempt (present with a dead-letter policy) is passed on."""
    assert parse_push(envelope(deliveryAttempt=3)).delivery_attempt == 3


def test_attribute_wins_over_data() -> None:
    """The job_id attribute is used when present."""
    assert parse_push(envelope(data={}, attributes={"job_id": "B" * 22})).job_id == "B" * 22


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {},
        {"message": "x"},
        {"message": {"data": "%%%not-base64"}},
        envelope(data={"job_id": "../../etc"}),
        envelope(data=["not", "an", "object"]),
    ],
)
def test_malformed_envelope_is_refused(body: Any) -> None:
    """Anything the ingress could not have published raises InvalidRequest."""
    with pytest.raises(InvalidRequest):
        parse_push(body)
