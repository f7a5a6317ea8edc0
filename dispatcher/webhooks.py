"""Signed webhooks: a POST to the job's (or its API key's) URL once the job is final.

Driven by the completion events (`dispatcher.events`): a second push subscription on
RESULTS_TOPIC delivers each event to the worker's `POST /webhooks`, which signs the
event's body the Standard Webhooks way (https://www.standardwebhooks.com/: headers
`webhook-id` = the job id, `webhook-timestamp`, `webhook-signature`) and POSTs it. A
receiver that fails is retried by Pub/Sub (the subscription's retry policy and
dead-letter topic), so no delivery lives only in one process's memory, until
WEBHOOK_DELIVERY_MAX_S after the job finished; then it is given up as undeliverable.

The URL is the caller's, so the dispatcher must not become a way into its own network
(SSRF): https only, and every address the host resolves to must be public, checked
when the connection is made (`GuardedTransport`: resolve, check every address, connect
to a checked one with the name as SNI and Host), not only when the job is accepted,
since a name can resolve elsewhere later. Redirects are not followed. Hosts the
operator lists in WEBHOOK_ALLOW_HOSTS skip the check (and may use plain http).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook

from dispatcher.errors import DispatcherError, InvalidRequest

log = logging.getLogger(__name__)
MAX_URL_CHARS = 2048
USER_AGENT = "vertex-dispatcher-webhooks"
# Names that lead inside whatever runs the service, refused before any lookup.
_INTERNAL_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal"})
_INTERNAL_SUFFIXES = (".localhost", ".internal", ".local")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


class WebhookRefused(DispatcherError):
    """The webhook's URL leads somewhere webhooks may not go."""


def address_refusal(address: IpAddress) -> str | None:
    """Why a webhook may not connect to `address`; None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None:
            return address_refusal(embedded)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (where cloud metadata servers live)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a public address"
    return None


def host_allowed(host: str, port: int | None, scheme: str, allow_hosts: frozenset[str]) -> bool:
    """Whether the operator allowed `host` (alone, or with this port) in WEBHOOK_ALLOW_HOSTS."""
    if not allow_hosts:
        return False
    host = host.lower()
    port = port or (443 if scheme == "https" else 80)
    named = f"[{host}]" if ":" in host else host
    return host in allow_hosts or f"{named}:{port}" in allow_hosts


def check_webhook_url(url: object, *, allow_hosts: frozenset[str]) -> str:
    """A webhook URL as given, once it may be used (what can be told without a lookup).

    Raises:
        ValueError: saying why not (not https, a user name, a private address, ...).
    """
    if not isinstance(url, str) or not url:
        raise ValueError("must be a URL string")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"is longer than {MAX_URL_CHARS} characters")
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ValueError("must be an https URL with a host")
    if parts.userinfo:
        raise ValueError("must not carry a user name or password")
    host = parts.host
    if host_allowed(host, parts.port, parts.scheme, allow_hosts):
        return url
    if parts.scheme != "https":
        raise ValueError("must be https (plain http only to a host in WEBHOOK_ALLOW_HOSTS)")
    try:
        literal: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    reason = address_refusal(literal) if literal is not None else None
    if reason is None and (host in _INTERNAL_NAMES or host.endswith(_INTERNAL_SUFFIXES)):
        reason = "an internal name"
    if reason is not None:
        raise ValueError(
            f"{host} is {reason}: webhooks go to public addresses only "
            "(or to a host the operator lists in WEBHOOK_ALLOW_HOSTS)"
        )
    return url


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (TCP).

    Raises:
        httpx.ConnectError: the name does not resolve (retried like a refused connection).
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise httpx.ConnectError(f"{host} resolves to no address")
    return addresses


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that connects only to public addresses (or allowed hosts).

    The host is resolved here, every address checked, and the request sent to the first
    one, with the name kept as Host header and TLS SNI (so the certificate is checked
    against the name). Connections are not kept alive: a pooled connection is found by
    address, and must not carry a request for another name verified under this one's.
    """

    def __init__(
        self,
        *,
        allow_hosts: frozenset[str],
        resolve: Resolver = resolve_host,
        inner: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._allow_hosts = allow_hosts
        self._resolve = resolve
        self._inner = inner or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_keepalive_connections=0), trust_env=False
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` to a checked address.

        Raises:
            WebhookRefused: the scheme or an address the host resolves to is not allowed.
        """
        url = request.url
        if host_allowed(url.host, url.port, url.scheme, self._allow_hosts):
            return await self._inner.handle_async_request(request)
        if url.scheme != "https":
            raise WebhookRefused(f"{url.host}: plain http only to a host in WEBHOOK_ALLOW_HOSTS")
        addresses = await self._resolve(url.host, url.port or 443)
        for text in addresses:
            reason = address_refusal(ipaddress.ip_address(text.split("%", 1)[0]))
            if reason is not None:
                raise WebhookRefused(f"{url.host} resolves to {text}, {reason}")
        request.extensions = {**request.extensions, "sni_hostname": url.host}
        request.url = url.copy_with(host=addresses[0])
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._inner.aclose()


def webhook_client(*, allow_hosts: frozenset[str], timeout_s: float) -> httpx.AsyncClient:
    """The worker's one client for webhooks: guarded, no redirects, no proxies from env."""
    return httpx.AsyncClient(
        transport=GuardedTransport(allow_hosts=allow_hosts),
        timeout=timeout_s,
        follow_redirects=False,
        trust_env=False,
    )


def signed_headers(secret: str, *, message_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of `body`, signed with `secret` (`whsec_...`)."""
    signature = Webhook(secret).sign(msg_id=message_id, timestamp=at, data=body.decode())
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
    }


def read_event(envelope: Any) -> bytes:
    """The completion event inside a Pub/Sub push request (its `message.data`).

    Raises:
        InvalidRequest: the envelope holds no base64 data.
    """
    message = envelope.get("message") if isinstance(envelope, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("data"), str):
        raise InvalidRequest("not a Pub/Sub push envelope with message.data")
    try:
        return base64.b64decode(message["data"], validate=True)
    except binascii.Error:
        raise InvalidRequest("message.data is not base64") from None


class DeliveryOutcome(enum.StrEnum):
    """What became of one delivery of an event's webhook."""

    DELIVERED = "delivered"  # the receiver answered 2xx
    RETRY = "retry"  # the receiver failed or was unreachable: redeliver later
    UNDELIVERABLE = "undeliverable"  # given up: refused, no secret, or too late
    NONE = "none"  # the job asked for no webhook


@dataclass(frozen=True, kw_only=True, slots=True)
class Delivery:
    """One delivery's outcome, the job it was for and why (for the log and the answer)."""

    outcome: DeliveryOutcome
    job_id: str | None = None
    reason: str = ""


class WebhookSender:
    """Signs and POSTs one completion event to its webhook.

    Args:
        client: The guarded client (`webhook_client`).
        secret_for: The signing secret for a key name (None: no key), or None if there
            is none to sign with.
        delivery_max_s: How long after the job's `updated_at` a delivery is still tried.
        clock: UTC now.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        secret_for: Callable[[str | None], str | None],
        delivery_max_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._secret_for = secret_for
        self._delivery_max_s = delivery_max_s
        self._clock = clock

    async def deliver(self, data: bytes) -> Delivery:
        """POST the event `data` (the body as published) to its webhook, signed."""
        try:
            event = json.loads(data)
            webhook = event.get("webhook") or {}
            url, key = webhook.get("url"), webhook.get("key")
            job_id = event["job_id"]
            finished = datetime.fromisoformat(str(event["updated_at"]).replace("Z", "+00:00"))
        except (ValueError, TypeError, KeyError, AttributeError):
            return Delivery(outcome=DeliveryOutcome.UNDELIVERABLE, reason="not a completion event")
        if not url:
            return Delivery(outcome=DeliveryOutcome.NONE, job_id=job_id)
        now = self._clock()
        if (now - finished).total_seconds() > self._delivery_max_s:
            return self._undeliverable(
                job_id, f"not delivered within WEBHOOK_DELIVERY_MAX_S ({self._delivery_max_s:g} s)"
            )
        secret = self._secret_for(key if isinstance(key, str) else None)
        if secret is None:
            return self._undeliverable(
                job_id, "no signing secret (the key's webhook_secret, or WEBHOOK_SECRET)"
            )
        headers = signed_headers(secret, message_id=job_id, body=data, at=now)
        try:
            response = await self._client.post(str(url), content=data, headers=headers)
        except WebhookRefused as exc:
            return self._undeliverable(job_id, str(exc))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return Delivery(outcome=DeliveryOutcome.RETRY, job_id=job_id, reason=type(exc).__name__)
        if 200 <= response.status_code < 300:
            return Delivery(outcome=DeliveryOutcome.DELIVERED, job_id=job_id)
        return Delivery(
            outcome=DeliveryOutcome.RETRY,
            job_id=job_id,
            reason=f"the receiver answered {response.status_code}",
        )

    def _undeliverable(self, job_id: str, reason: str) -> Delivery:
        return Delivery(outcome=DeliveryOutcome.UNDELIVERABLE, job_id=job_id, reason=reason)

    async def close(self) -> None:
        """Close the client."""
        await self._client.aclose()
