"""The completion event of a final job (dispatcher/events.py)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from dispatcher.events import completion_event
from dispatcher.jobs import Job, JobError, JobStatus


@pytest.mark.parametrize(("max_bytes", "carried"), [(0, False), (10, False), (1000, True)])
def test_result_is_carried_only_when_it_fits(
    job_factory: Callable[..., Job], max_bytes: int, carried: bool
) -> None:
    """The response body is in the event only when its JSON fits in max_result_bytes."""
    job = job_factory(status=JobStatus.SUCCEEDED, result={"candidates": ["a long answer"]})
    data, _ = completion_event(job, max_result_bytes=max_bytes)
    assert ("result" in json.loads(data)) is carried


def test_event_names_the_outcome_and_its_filters(job_factory: Callable[..., Job]) -> None:
    """A failed job's event has its error, model, tier and labels; the attributes carry
    status, owner and batch_id for subscription filters."""
    job = job_factory(
        status=JobStatus.FAILED,
        owner="alice",
        error=JobError(code=400, status="INVALID_ARGUMENT", message="bad"),
        request={"contents": [], "labels": {"batch_id": "b1"}},
        models_tried=("m2",),
        tiers_tried=("flex",),
    )
    data, attributes = completion_event(job, max_result_bytes=0)
    body = json.loads(data)
    assert (body["status"], body["model"], body["tier"], body["batch_id"]) == (
        "failed",
        "m2",
        "flex",
        "b1",
    )
    assert body["error"] == {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"}
    assert attributes == {
        "job_id": job.job_id,
        "status": "failed",
        "owner": "alice",
        "batch_id": "b1",
    }
