"""The job model: one generateContent call made durable, and its states."""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

JsonObject = dict[str, Any]

# 16 random bytes, URL-safe base64 without padding: 128 bits, 22 characters.
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True, kw_only=True, slots=True)
class JobError:
    """Why a job failed: Vertex's own code, status and message where Vertex said no."""

    code: int
    status: str
    message: str

    def to_doc(self) -> JsonObject:
        """The error as stored and as shown to clients."""
        return {"code": self.code, "status": self.status, "message": self.message}

    @classmethod
    def from_doc(cls, doc: JsonObject) -> JobError:
        """Rebuild an error from `to_doc()` output."""
        return cls(code=int(doc["code"]), status=str(doc["status"]), message=str(doc["message"]))


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """A durable generateContent call.

    Attributes:
        region: The region assigned at submission, then the region that served it.
        attempts: Vertex calls made for this job, over all deliveries.
        deliveries: Executions started (Pub/Sub deliveries or in-process runs).
        regions_tried: Every region called, in order.
        lease_owner: Token of the execution holding the job while it is running.
        lease_until: When that lease lapses unless renewed.
        sweep_at: When the recovery sweep must look at the job if nothing else has
            moved it on (a lost publish, a dead executor); None once terminal.
        expire_at: When the record may be deleted (Firestore TTL; memory eviction).
        owner: Who created the job (an API key's id), None when keys are off;
            only the owner may see it.
        idempotency_key: The client's Idempotency-Key, if it sent one.
        request_hash: SHA-256 of the request as submitted (to tell a replay from a conflict).
        trace: Cloud Logging trace name of the submitting request, so the worker's
            log lines about the job join the same trace.
        tier: The consumption tier asked for (`settings.Tier`'s values).
        deadline: When the job must be done by; past it, it fails DEADLINE_EXCEEDED.
        tiers_tried: The tier of each call, beside `regions_tried`.
        fallback: Whether the job may move to its model's fallbacks.
        models_tried: The model of each call, beside `regions_tried`.
        priority: The key's class (`interactive` or `batch`): batch calls wait for
            region slots behind interactive ones.
        weight: The key's weight in the fair share of region slots.
        event_pending: Final, and its completion event not yet published (RESULTS_TOPIC).
        usage: Vertex's `usageMetadata` of the answer (tokens, `trafficType`).
        webhook_url: Where a signed POST goes once the job is final (the request's
            `webhook.url`, else its key's `webhook`); None for no webhook.
    """

    job_id: str
    model: str
    region: str
    request: JsonObject
    status: JobStatus = JobStatus.PENDING
    created_at: datetime
    updated_at: datetime
    expire_at: datetime
    attempts: int = 0
    deliveries: int = 0
    regions_tried: tuple[str, ...] = ()
    result: JsonObject | None = None
    error: JobError | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None
    sweep_at: datetime | None = None
    session_id: str | None = None
    owner: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    trace: str | None = None
    tier: str = "standard"
    deadline: datetime | None = None
    tiers_tried: tuple[str, ...] = ()
    fallback: bool = True
    models_tried: tuple[str, ...] = ()
    usage: JsonObject | None = None
    priority: str = "interactive"
    weight: float = 1.0
    event_pending: bool = False
    webhook_url: str | None = None

    def to_doc(self) -> JsonObject:
        """The job as a plain mapping for a store; `request`/`result` stay JSON objects."""
        return {
            "job_id": self.job_id,
            "model": self.model,
            "region": self.region,
            "request": self.request,
            "status": self.status.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expire_at": self.expire_at,
            "attempts": self.attempts,
            "deliveries": self.deliveries,
            "regions_tried": list(self.regions_tried),
            "result": self.result,
            "error": self.error.to_doc() if self.error else None,
            "lease_owner": self.lease_owner,
            "lease_until": self.lease_until,
            "sweep_at": self.sweep_at,
            "session_id": self.session_id,
            "owner": self.owner,
            "idempotency_key": self.idempotency_key,
            "request_hash": self.request_hash,
            "trace": self.trace,
            "tier": self.tier,
            "deadline": self.deadline,
            "tiers_tried": list(self.tiers_tried),
            "fallback": self.fallback,
            "models_tried": list(self.models_tried),
            "priority": self.priority,
            "weight": self.weight,
            "event_pending": self.event_pending,
            "usage": self.usage,
            "webhook_url": self.webhook_url,
        }

    @classmethod
    def from_doc(cls, doc: JsonObject) -> Job:
        """Rebuild a job from `to_doc()` output (as read back from a store)."""
        error = doc.get("error")
        return cls(
            job_id=str(doc["job_id"]),
            model=str(doc["model"]),
            region=str(doc["region"]),
            request=dict(doc["request"]),
            status=JobStatus(doc["status"]),
            created_at=as_utc(doc["created_at"]),
            updated_at=as_utc(doc["updated_at"]),
            expire_at=as_utc(doc["expire_at"]),
            attempts=int(doc.get("attempts", 0)),
            deliveries=int(doc.get("deliveries", 0)),
            regions_tried=tuple(doc.get("regions_tried") or ()),
            result=dict(doc["result"]) if doc.get("result") is not None else None,
            error=JobError.from_doc(error) if error else None,
            lease_owner=doc.get("lease_owner"),
            lease_until=as_utc(doc["lease_until"]) if doc.get("lease_until") else None,
            sweep_at=as_utc(doc["sweep_at"]) if doc.get("sweep_at") else None,
            session_id=doc.get("session_id"),
            owner=doc.get("owner"),
            idempotency_key=doc.get("idempotency_key"),
            request_hash=doc.get("request_hash"),
            trace=doc.get("trace"),
            tier=str(doc.get("tier") or "standard"),
            deadline=as_utc(doc["deadline"]) if doc.get("deadline") else None,
            tiers_tried=tuple(doc.get("tiers_tried") or ()),
            fallback=bool(doc.get("fallback", True)),
            models_tried=tuple(doc.get("models_tried") or ()),
            priority=str(doc.get("priority") or "interactive"),
            weight=float(doc.get("weight") or 1.0),
            event_pending=bool(doc.get("event_pending", False)),
            usage=dict(doc["usage"]) if doc.get("usage") else None,
            webhook_url=doc.get("webhook_url") or None,
        )


def new_job_id() -> str:
    """A random, unguessable job id (128 bits)."""
    return secrets.token_urlsafe(16)


def is_job_id(text: str) -> bool:
    """Whether `text` has the shape of a job id (checked before any store lookup)."""
    return bool(_JOB_ID.match(text))


def as_utc(moment: datetime) -> datetime:
    """The same instant as an aware UTC datetime (stores may hand back naive or other zones)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with a `Z` suffix and millisecond precision."""
    return as_utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")
