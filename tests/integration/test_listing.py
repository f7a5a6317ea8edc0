"""GET /jobs and GET /usage over HTTP, per caller, in modes 1 and 3."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_security import as_, keys_file
from tests.support.stack import MODEL, Stack, prompt, unique

pytestmark = pytest.mark.integration


def _submit_as(stack: Stack, name: str, text: str) -> str:
    response = stack.submit(prompt(text), headers=as_(name))
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _wait_as(stack: Stack, name: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        view = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", headers=as_(name)).json()
        if view["status"] in ("succeeded", "failed", "cancelled"):
            return dict(view)
        assert time.monotonic() < deadline, view
        time.sleep(0.05)


def _get(stack: Stack, path: str, name: str, **params: Any) -> dict[str, Any]:
    response = stack.http.get(f"{stack.ingress.url}{path}", params=params, headers=as_(name))
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_jobs_are_listed_per_caller_newest_first_in_pages(
    stack_factory: Callable[..., Stack], tmp_path: Path, mode: str
) -> None:
    """GET /jobs pages through the caller's own jobs newest first, each once, with
    counts by status on the first page; another caller's jobs never appear."""
    stack = stack_factory(mode, API_KEYS_FILE=keys_file(tmp_path))
    mine = [_submit_as(stack, "alice", unique("list")) for _ in range(5)]
    theirs = _submit_as(stack, "bob", unique("list"))
    for job_id in mine:
        _wait_as(stack, "alice", job_id)
    first = _get(stack, "/jobs", "alice", page_size=2)
    assert first["counts"]["succeeded"] == 5
    listed = [job["job_id"] for job in first["jobs"]]
    token = first["next_page_token"]
    while token:
        page = _get(stack, "/jobs", "alice", page_size=2, page_token=token)
        assert "counts" not in page
        listed += [job["job_id"] for job in page["jobs"]]
        token = page["next_page_token"]
    assert listed == list(reversed(mine))
    assert theirs not in listed
    assert all("result" not in job for job in first["jobs"])


def test_usage_totals_match_the_jobs(stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    """GET /usage adds up the caller's answered jobs' usageMetadata by model and tier."""
    stack = stack_factory("memory", API_KEYS_FILE=keys_file(tmp_path))
    views = [
        _wait_as(stack, "alice", _submit_as(stack, "alice", unique("use") * (i + 1)))
        for i in range(3)
    ]
    _wait_as(stack, "bob", _submit_as(stack, "bob", unique("other")))
    [row] = _get(stack, "/usage", "alice")["usage"]
    assert (row["model"], row["tier"], row["jobs"]) == (MODEL, "standard", 3)
    assert row["total"] == sum(view["usage"]["totalTokenCount"] for view in views)
    assert row["prompt"] == sum(view["usage"]["promptTokenCount"] for view in views)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"status": "done"}, "status:"),
        ({"since": "yesterday"}, "since:"),
        ({"page_size": "0"}, "page_size:"),
        ({"page_size": "501"}, "page_size:"),
        ({"page_token": "bm90IGEgdG9rZW4"}, "page_token:"),
    ],
)
def test_bad_listing_parameters_are_400(
    stack_factory: Callable[..., Stack], params: dict[str, str], says: str
) -> None:
    """A bad status, since, page_size or page_token is a 400 naming the parameter."""
    stack = stack_factory("memory")
    response = stack.http.get(f"{stack.ingress.url}/jobs", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(says)
