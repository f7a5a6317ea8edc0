"""The worker: executes jobs that Pub/Sub pushes to it.

Answers 2xx when the job needs nothing more (succeeded, failed for good and
recorded, already finished, or a message that can never be run), and 503 only
when a redelivery should retry it, because every nack slows push delivery for
the whole subscription (https://cloud.google.com/pubsub/docs/push#push_backoff).

With PUSH_AUDIENCE and PUSH_SERVICE_ACCOUNT set, a push must carry Pub/Sub's OIDC
token for them before its body is even read: 401 for a missing or invalid token,
403 for a valid token of another account (both are nacks, so a misconfigured
subscription retries and dead-letters rather than losing messages).

`POST /webhooks` takes the completion events (RESULTS_TOPIC) from a second push
subscription, authenticated the same way, and POSTs each job's signed webhook
(`dispatcher.webhooks`): 200 once delivered or given up, 503 to have Pub/Sub retry it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dispatcher.auth import AuthError, KeyRing, PushVerifier
from dispatcher.errors import InvalidRequest, StoreUnavailable
from dispatcher.executor import RunResult
from dispatcher.http import (
    BodyTooLarge,
    error_response,
    healthz,
    internal_error,
    json_response,
    metrics,
    read_body,
)
from dispatcher.metrics import WEBHOOKS
from dispatcher.pubsub import parse_push
from dispatcher.runtime import Runtime, open_runtime
from dispatcher.settings import Settings
from dispatcher.webhooks import DeliveryOutcome, WebhookSender, read_event, webhook_client

log = logging.getLogger("worker")
MAX_ENVELOPE_BYTES = 64 * 1024  # the ingress publishes ids, not requests
# A completion event may carry a response body (RESULTS_EVENT_RESULT_BYTES), base64 in push.
MAX_EVENT_ENVELOPE_BYTES = 16 * 1024 * 1024


def create_app(settings: Settings) -> Starlette:
    """The worker ASGI app."""
    verifier = push_verifier(settings)
    # The keys' webhook secrets: read at start-up (and again when the file changes).
    keyring = KeyRing.load(settings.api_keys_file) if settings.api_keys_file else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if verifier is None:
            log.warning(
                "PUSH AUTHENTICATION IS OFF: anyone who can reach this service can make it "
                "run jobs. Set PUSH_AUDIENCE and PUSH_SERVICE_ACCOUNT (the push "
                "subscription's --push-auth-token-audience and --push-auth-service-account)."
            )
        else:
            log.info(
                "push authentication on",
                extra={"audience": verifier.audience, "service_account": verifier.service_account},
            )
        sender = webhook_sender(settings, keyring)
        app.state.webhooks = sender
        try:
            async with open_runtime(settings, executes=True) as runtime:
                app.state.runtime = runtime
                log.info("worker ready", extra={"mode": settings.mode.value})
                yield
        finally:
            await sender.close()

    app = Starlette(
        routes=[
            Route("/", push, methods=["POST"]),
            Route("/webhooks", webhook_push, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={Exception: internal_error},
    )
    app.state.push_verifier = verifier
    return app


def push_verifier(settings: Settings) -> PushVerifier | None:
    """The push token checker the settings ask for; None when push auth is off."""
    if settings.push_audience is None or settings.push_service_account is None:
        return None
    return PushVerifier(
        audience=settings.push_audience,
        service_account=settings.push_service_account,
        certs_url=settings.push_certs_url,
    )


def webhook_sender(settings: Settings, keyring: KeyRing | None) -> WebhookSender:
    """The webhook sender: the key's `webhook_secret`, else WEBHOOK_SECRET, signs."""

    def secret_for(key: str | None) -> str | None:
        own = keyring.current.policy(key).webhook_secret if keyring and key else None
        return own or settings.webhook_secret

    return WebhookSender(
        webhook_client(
            allow_hosts=settings.webhook_allow_hosts, timeout_s=settings.webhook_timeout_s
        ),
        secret_for=secret_for,
        delivery_max_s=settings.webhook_delivery_max_s,
    )


async def webhook_push(request: Request) -> Response:
    """POST /webhooks: one completion event pushed by the webhook subscription."""
    refusal = await _push_refusal(request)
    if refusal is not None:
        return refusal
    sender: WebhookSender = request.app.state.webhooks
    try:
        data = read_event(json.loads(await read_body(request, MAX_EVENT_ENVELOPE_BYTES)))
    except (BodyTooLarge, InvalidRequest, ValueError, RecursionError) as exc:
        log.error("malformed webhook push acknowledged", extra={"reason": str(exc)[:300]})
        return json_response({"acknowledged": True, "reason": str(exc)[:300]}, 200)
    delivery = await sender.deliver(data)
    extra = {"job_id": delivery.job_id, "reason": delivery.reason[:300]}
    if delivery.outcome is DeliveryOutcome.NONE:
        return json_response({"job_id": delivery.job_id, "webhook": "none"}, 200)
    WEBHOOKS.labels(delivery.outcome.value).inc()
    if delivery.outcome is DeliveryOutcome.RETRY:
        log.warning("webhook not delivered; Pub/Sub will redeliver", extra=extra)
        return error_response(503, f"webhook not delivered ({delivery.reason}); redeliver later")
    if delivery.outcome is DeliveryOutcome.UNDELIVERABLE:
        log.error("webhook undeliverable; given up", extra=extra)
    else:
        log.info("webhook delivered", extra={"job_id": delivery.job_id})
    return json_response({"job_id": delivery.job_id, "webhook": delivery.outcome.value}, 200)


async def push(request: Request) -> Response:
    """POST /: one Pub/Sub push delivery."""
    refusal = await _push_refusal(request)
    if refusal is not None:
        return refusal
    runtime: Runtime = request.app.state.runtime
    assert runtime.executor is not None
    try:
        envelope = json.loads(await read_body(request, MAX_ENVELOPE_BYTES))
        delivery = parse_push(envelope)
    except (BodyTooLarge, InvalidRequest, ValueError, RecursionError) as exc:
        # Redelivering a message that can never be read would loop forever: ack it.
        # (ValueError covers bad UTF-8 and JSON; RecursionError, JSON nested too deep.)
        log.error("malformed push request acknowledged", extra={"reason": str(exc)[:300]})
        return json_response({"acknowledged": True, "reason": str(exc)[:300]}, 200)
    try:
        outcome = await runtime.executor.run(
            delivery.job_id, delivery_attempt=delivery.delivery_attempt
        )
    except StoreUnavailable as exc:
        log.error("job store unavailable", extra={"job_id": delivery.job_id, "reason": str(exc)})
        return error_response(503, "job store unavailable; redeliver later")
    status = outcome.job.status.value if outcome.job else "missing"
    if outcome.result is RunResult.RETRY:
        return error_response(
            503,
            f"job {delivery.job_id} not finished ({status}); redeliver later",
            {"Retry-After": str(int(outcome.retry_after_s) or 1)},
        )
    return json_response({"job_id": delivery.job_id, "status": status}, 200)


async def _push_refusal(request: Request) -> Response | None:
    """The answer to a push whose OIDC token does not pass (None: it passes, or push
    authentication is off)."""
    verifier: PushVerifier | None = request.app.state.push_verifier
    if verifier is None:
        return None
    try:
        await verifier.verify(request.headers.get("authorization"))
    except AuthError as exc:
        return _refused(exc)
    return None


def _refused(exc: AuthError) -> Response:
    """A push that failed authentication: logged without its token, answered in shape."""
    log.warning("push refused", extra={"reason": str(exc), "http_status": exc.http_status})
    if exc.http_status == 503:
        return error_response(503, f"cannot check push tokens now: {exc}", {"Retry-After": "10"})
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    return error_response(exc.http_status, f"push authentication failed: {exc}", headers)
