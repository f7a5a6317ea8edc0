"""A caller's jobs, listed page by page, and their token usage totals.

`GET /jobs` and `GET /usage` read through here. Pages are newest first; a page token
is opaque to the client (the last job's creation time and id, base64url-encoded), so a
page does not move when newer jobs arrive meanwhile.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from dispatcher.errors import InvalidRequest
from dispatcher.jobs import Job, JobStatus, as_utc
from dispatcher.store import JobQuery, JobStore

MAX_PAGE_SIZE = 500
# GET /usage reads at most this many jobs (pages of MAX_PAGE_SIZE); past it the totals
# say they are partial. /metrics' dispatcher_tokens_total is the unbounded view.
USAGE_SCAN_MAX = 20_000
TOKEN_FIELDS: Mapping[str, str] = {
    "prompt": "promptTokenCount",
    "candidates": "candidatesTokenCount",
    "cached": "cachedContentTokenCount",
    "thoughts": "thoughtsTokenCount",
    "total": "totalTokenCount",
}


@dataclass(frozen=True, slots=True)
class Page:
    """One page of jobs and the token of the next (None on the last page)."""

    jobs: list[Job]
    next_page_token: str | None


async def list_page(
    store: JobStore,
    *,
    owner: str | None,
    status: JobStatus | None,
    since: datetime | None,
    page_size: int,
    page_token: str | None,
) -> Page:
    """One page of the owner's jobs, newest first.

    Raises:
        InvalidRequest: a page token this service did not make.
    """
    after = _decode_token(page_token) if page_token else None
    jobs = await store.list_jobs(
        JobQuery(owner=owner, status=status, since=since, after=after, limit=page_size + 1)
    )
    if len(jobs) <= page_size:
        return Page(jobs, None)
    last = jobs[page_size - 1]
    return Page(jobs[:page_size], _encode_token(last))


async def usage_totals(
    store: JobStore, *, owner: str | None, since: datetime | None
) -> tuple[dict[tuple[str, str], dict[str, int]], bool]:
    """Token totals of the owner's answered jobs by (model, tier) that answered.

    Returns:
        The totals (each with a `jobs` count), and whether the scan stopped at
        USAGE_SCAN_MAX jobs (the totals are then partial).
    """
    totals: dict[tuple[str, str], dict[str, int]] = {}
    token: str | None = None
    scanned = 0
    while True:
        page = await list_page(
            store,
            owner=owner,
            status=JobStatus.SUCCEEDED,
            since=since,
            page_size=MAX_PAGE_SIZE,
            page_token=token,
        )
        for job in page.jobs:
            add_usage(totals, job)
        scanned += len(page.jobs)
        token = page.next_page_token
        if token is None:
            return totals, False
        if scanned >= USAGE_SCAN_MAX:
            return totals, True


def add_usage(totals: dict[tuple[str, str], dict[str, int]], job: Job) -> None:
    """Add an answered job's token counts to its (model, tier) row (missing fields: 0)."""
    if job.usage is None:
        return
    model = job.models_tried[-1] if job.models_tried else job.model
    tier = job.tiers_tried[-1] if job.tiers_tried else job.tier
    row = totals.setdefault((model, tier), {"jobs": 0, **dict.fromkeys(TOKEN_FIELDS, 0)})
    row["jobs"] += 1
    for kind, field in TOKEN_FIELDS.items():
        count = job.usage.get(field)
        if isinstance(count, int) and not isinstance(count, bool):
            row[kind] += count


def _encode_token(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, job_id = json.loads(raw)
        return as_utc(datetime.fromisoformat(created_at)), str(job_id)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidRequest(
            "page_token: not a token from this service (pass next_page_token as given)",
            field="page_token",
        ) from None
