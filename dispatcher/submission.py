"""Submission: the one way a job enters the system.

Both of the ingress's routes (`POST /generate` and the Vertex-compatible one) parse
a request into a `Submission` and call `Submitter.submit`, which holds the rules of
entry in one place:

- **routing**: the model (the request's or the default) must be configured; the
  region is the context cache's when the request names one, the session's when it
  has a session id, else the next in the model's round-robin;
- **idempotency**: with an Idempotency-Key the job id is derived from the caller and
  the key, so a retried request finds its earlier job (replayed when the body is the
  same, refused when it differs), including when two copies race to create it;
- **admission**: room is reserved in the queue before the record is written and
  given back on every path that does not dispatch the job;
- **compensation**: a job stored but not handed to the queue is failed at once
  (or, if even that write fails, re-dispatched by the recovery sweep), so an
  accepted job never waits for ever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from dispatcher.errors import (
    IdempotencyConflict,
    InvalidRequest,
    JobExists,
    JobNotStored,
    PublishFailed,
    StoreUnavailable,
)
from dispatcher.jobs import Job, JobError, JsonObject
from dispatcher.lifecycle import JobManager
from dispatcher.metrics import KEY_REFUSALS
from dispatcher.queue import JobQueue
from dispatcher.regions import RoundRobin, pinned_region, session_region
from dispatcher.settings import ModelConfig, Tier
from dispatcher.tenants import NO_POLICY, KeyLimited, KeyPolicy, TenantGate, estimate_tokens
from dispatcher.tiers import parse_tier

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Submission:
    """A parsed request to run.

    Attributes:
        request: The GenerateContentRequest, without its `model` field.
        model: The model asked for; None for the default.
        owner: The caller's id (API key name); None when keys are off.
        idempotency_key: The request's Idempotency-Key, if any.
        session_id: The request's X-Session-Id, if any.
        trace: The request's trace id, if any.
        tier: The tier asked for (a name, or None for the model's default).
        deadline: When the job must be done by, if the request says.
        fallback: Whether the job may move to the model's fallbacks.
        policy: The calling key's policy (limits, allowed models and tiers).
        webhook_url: The request's checked webhook URL; None for the key's, if any.
    """

    request: JsonObject
    model: str | None = None
    owner: str | None = None
    idempotency_key: str | None = None
    session_id: str | None = None
    trace: str | None = None
    tier: object = None
    deadline: datetime | None = None
    fallback: bool = True
    policy: KeyPolicy = NO_POLICY
    webhook_url: str | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """A submission's outcome: the job, and whether it is an earlier one replayed."""

    job: Job
    replayed: bool


class Submitter:
    """Stores and dispatches submissions by the rules above."""

    def __init__(
        self,
        manager: JobManager,
        queue: JobQueue,
        *,
        models: Mapping[str, ModelConfig],
        default_model: str,
        round_robin: Mapping[str, RoundRobin],
        gate: TenantGate | None = None,
    ) -> None:
        self._manager = manager
        self._queue = queue
        self._models = models
        self._default_model = default_model
        self._round_robin = round_robin
        self._gate = gate

    async def submit(self, submission: Submission) -> Accepted:
        """Store a pending job for the submission and hand it to the queue.

        Raises:
            InvalidRequest: the model is not configured, or the context cache lives
                in a region the model is not configured for.
            IdempotencyConflict: the Idempotency-Key was used with another body.
            Overloaded: too much work is waiting.
            KeyForbidden: the key may not use the model or tier.
            KeyLimited: the key is over one of its limits.
            JobNotStored: the record could not be written; nothing was queued.
            StoreUnavailable: an earlier job could not be read.
            PublishFailed: the job could not be handed to the queue (it is failed).
        """
        model_id, region = self._route(submission)
        policy = submission.policy
        asked = submission.tier if submission.tier is not None else policy.default_tier
        tier = parse_tier(asked, self._models[model_id])
        if tier in (Tier.FLEX, Tier.PRIORITY, Tier.AUTO) and pinned_region(submission.request):
            raise InvalidRequest(
                f"tier: {tier} runs on 'global', but the request's cachedContent lives in "
                f"{region}; use tier standard or provisioned",
                field="tier",
            )
        key = submission.idempotency_key
        # Only a key can replay a job, so only then is the request's hash needed.
        request_hash = _request_hash(model_id, tier, submission.request) if key else None
        job_id = _idempotent_job_id(submission.owner, key) if key else None
        if job_id is not None and request_hash is not None:
            earlier = await self._manager.get(job_id)
            if earlier is not None:
                return Accepted(_replay(earlier, request_hash), replayed=True)
        if self._gate is not None and submission.owner is not None:
            self._gate.check_use(submission.owner, policy, model=model_id, tier=tier)
            try:
                await self._gate.admit(
                    submission.owner,
                    policy,
                    estimated_tokens=estimate_tokens(submission.request),
                )
            except KeyLimited as exc:
                KEY_REFUSALS.labels(submission.owner, exc.limit).inc()
                raise
        self._queue.admit()
        job = self._manager.new_job(
            job_id=job_id,
            model=model_id,
            region=region,
            request=submission.request,
            session_id=submission.session_id,
            owner=submission.owner,
            idempotency_key=key,
            request_hash=request_hash,
            trace=submission.trace,
            tier=tier.value,
            deadline=submission.deadline,
            fallback=submission.fallback,
            priority=policy.priority.value,
            weight=policy.weight,
        )
        webhook_url = submission.webhook_url or policy.webhook
        if webhook_url is not None:
            job = replace(job, webhook_url=webhook_url)
        try:
            await self._manager.store.create(job)
        except JobExists:
            self._queue.cancel_admission()
            return await self._lost_create_race(job, request_hash)
        except StoreUnavailable as exc:
            self._queue.cancel_admission()
            log.error("could not store job", extra={"job_id": job.job_id, "reason": str(exc)})
            raise JobNotStored() from exc
        try:
            await self._queue.dispatch(job)
        except PublishFailed as exc:
            self._queue.cancel_admission()
            log.error("could not publish job", extra={"job_id": job.job_id, "reason": str(exc)})
            await self._fail_unpublished(job)
            raise
        return Accepted(job, replayed=False)

    def _route(self, submission: Submission) -> tuple[str, str]:
        """The model and the region a new job is assigned."""
        model_id = submission.model or self._default_model
        model = self._models.get(model_id)
        if model is None:
            configured = ", ".join(self._models)
            raise InvalidRequest(
                f"model: {model_id!r} is not configured (configured: {configured})"
            )
        pinned = pinned_region(submission.request)
        if pinned is not None:
            if pinned not in model.regions:
                raise InvalidRequest(
                    f"cachedContent: the cache lives in {pinned}, which is not configured for "
                    f"{model_id} (regions: {', '.join(model.regions)})"
                )
            return model_id, pinned
        if submission.session_id:
            return model_id, session_region(model.regions, submission.session_id)
        return model_id, self._round_robin[model_id].assign_region()

    async def _lost_create_race(self, job: Job, request_hash: str | None) -> Accepted:
        """Another copy of the request created the job first: replay it."""
        if request_hash is None:  # a random id already taken: practically never
            raise JobNotStored("the job could not be stored; try again")
        earlier = await self._manager.get(job.job_id)
        if earlier is None:  # expired between the two reads: practically never
            raise JobNotStored("the job could not be stored; try again")
        return Accepted(_replay(earlier, request_hash), replayed=True)

    async def _fail_unpublished(self, job: Job) -> None:
        failure = JobError(code=503, status="UNAVAILABLE", message="the job could not be queued")
        try:
            await self._manager.fail_pending(job.job_id, failure)
        except StoreUnavailable:
            # The recovery sweep re-publishes it after PUBLISH_GRACE_S: it is not lost,
            # but the client was told it failed, so say so in the log.
            log.error("could not mark unpublished job failed", extra={"job_id": job.job_id})


def _replay(earlier: Job, request_hash: str) -> Job:
    if earlier.request_hash != request_hash:
        raise IdempotencyConflict()
    return earlier


def _idempotent_job_id(owner: str | None, key: str) -> str:
    """The job id an Idempotency-Key stands for: one per caller and key, 132 bits."""
    digest = hashlib.sha256(f"idempotency\0{owner or ''}\0{key}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()[:22]


def _request_hash(model_id: str, tier: Tier, request: JsonObject) -> str:
    # The deadline is left out: "seconds from now" differs on every retry of a request.
    canonical = json.dumps([model_id, tier.value, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
