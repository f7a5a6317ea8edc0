"""Signed webhooks: signatures, the SSRF guard, URL checks, and delivery outcomes."""

from __future__ import annotations

import base64
import ipaddress
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from dispatcher.errors import InvalidRequest
from dispatcher.settings import Settings
from dispatcher.tenants import parse_policy
from dispatcher.validation import parse_webhook
from dispatcher.webhooks import (
    DeliveryOutcome,
    GuardedTransport,
    WebhookRefused,
    WebhookSender,
    address_refusal,
    check_webhook_url,
    read_event,
    signed_headers,
)

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def event(url: str | None = "https://hooks.example.com/in", *, age_s: float = 1.0) -> bytes:
    """A completion event body as `dispatcher.events` publishes it."""
    body = {
        "job_id": "ukV6JbVIt7GX_yoGnqAYwg",
        "status": "succeeded",
        "owner": "team-a",
        "updated_at": (NOW - timedelta(seconds=age_s)).isoformat().replace("+00:00", "Z"),
        "webhook": {"url": url, "key": "team-a"} if url else None,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def test_signature_verifies_with_standardwebhooks() -> None:
    """The headers signed here verify with the package's own Webhook.verify."""
    body = event()
    headers = signed_headers(
        SECRET, message_id="ukV6JbVIt7GX_yoGnqAYwg", body=body, at=datetime.now(UTC)
    )
    assert headers["webhook-id"] == "ukV6JbVIt7GX_yoGnqAYwg"
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == json.loads(body)


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "public"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_refusal(address: str, refused: str | None) -> None:
    """Loopback, private, link-local (metadata), multicast and the like are refused."""
    reason = address_refusal(ipaddress.ip_address(address))
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://hooks.example.com/x", "must be https"),
        ("https://10.0.0.1/x", "10.0.0.1 is a private address"),
        ("https://169.254.169.254/latest", "link-local"),
        ("https://[::1]:8443/x", "loopback"),
        ("https://localhost/x", "an internal name"),
        ("https://metadata.google.internal/x", "an internal name"),
        ("https://user:pw@hooks.example.com/x", "user name or password"),
        ("ftp://hooks.example.com/x", "https URL with a host"),
        ("https://" + "a" * 2050, "longer than 2048"),
        (42, "must be a URL string"),
    ],
)
def test_webhook_urls_refused_with_reason(url: object, message: str) -> None:
    """Each refused URL says why."""
    with pytest.raises(ValueError, match=message):
        check_webhook_url(url, allow_hosts=frozenset())


def test_allowed_hosts_may_use_http_and_private_addresses() -> None:
    """A host in WEBHOOK_ALLOW_HOSTS (alone or with its port) passes, http included."""
    assert check_webhook_url("http://127.0.0.1:9000/h", allow_hosts=frozenset({"127.0.0.1"}))
    assert check_webhook_url("http://127.0.0.1:9000/h", allow_hosts=frozenset({"127.0.0.1:9000"}))
    with pytest.raises(ValueError, match="loopback"):
        check_webhook_url("https://127.0.0.1:9001/h", allow_hosts=frozenset({"127.0.0.1:9000"}))


def test_request_webhook_field_messages() -> None:
    """`webhook` must be {"url": ...}; a refused URL names webhook.url and the reason."""
    assert parse_webhook(None, allow_hosts=frozenset()) is None
    with pytest.raises(InvalidRequest, match=r'webhook: must be an object \{"url"') as shape:
        parse_webhook("https://hooks.example.com", allow_hosts=frozenset())
    assert shape.value.field == "webhook"
    with pytest.raises(InvalidRequest, match=r"webhook\.url: 10\.0\.0\.7 is a private") as private:
        parse_webhook({"url": "https://10.0.0.7/h"}, allow_hosts=frozenset())
    assert private.value.field == "webhook.url"


def test_settings_parse_webhook_variables() -> None:
    """WEBHOOK_* settings parse; a bad secret is refused without being quoted."""
    base = {
        "GOOGLE_CLOUD_PROJECT": "p",
        "MODEL_ID": "m",
        "MODEL_CONFIG": '[{"model_id": "m", "supported_regions": ["us-central1"]}]',
    }
    settings = Settings.from_env(
        {**base, "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_HOSTS": "127.0.0.1:9000, Hooks.Local"}
    )
    assert settings.webhook_allow_hosts == {"127.0.0.1:9000", "hooks.local"}
    assert SECRET not in repr(settings)
    with pytest.raises(Exception, match="WEBHOOK_SECRET") as bad:
        Settings.from_env({**base, "WEBHOOK_SECRET": "whsec_c2hvcnQ="})
    assert "c2hvcnQ" not in str(bad.value)


def test_key_policy_webhook_words() -> None:
    """A key's webhook and webhook_secret parse; the secret stays out of its repr."""
    policy = parse_policy(["webhook=https://hooks.example.com/a", f"webhook_secret={SECRET}"])
    assert policy.webhook == "https://hooks.example.com/a"
    assert policy.webhook_secret == SECRET
    assert SECRET not in repr(policy)
    with pytest.raises(ValueError, match="webhook_secret is not whsec_"):
        parse_policy(["webhook_secret=plain"])
    with pytest.raises(ValueError, match="not an https URL"):
        parse_policy(["webhook=ftp://x"])


async def test_transport_connects_to_the_checked_address_with_the_name() -> None:
    """The request goes to the resolved public address, Host and SNI being the name."""
    seen: list[httpx.Request] = []

    async def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("hooks.example.com", 443)
        return ["93.184.215.14"]

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    transport = GuardedTransport(
        allow_hosts=frozenset(), resolve=resolve, inner=httpx.MockTransport(answer)
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post("https://hooks.example.com/in", content=b"{}")
    assert response.status_code == 204
    assert seen[0].url.host == "93.184.215.14"
    assert seen[0].headers["host"] == "hooks.example.com"
    assert seen[0].extensions["sni_hostname"] == "hooks.example.com"


@pytest.mark.parametrize("addresses", [["10.0.0.1"], ["93.184.215.14", "169.254.169.254"]])
async def test_transport_refuses_a_name_resolving_to_a_private_address(
    addresses: list[str],
) -> None:
    """If any address of the name is not public, nothing is sent (DNS rebinding too)."""

    async def resolve(host: str, port: int) -> list[str]:
        return addresses

    def answer(request: httpx.Request) -> httpx.Response:
        raise AssertionError("must not be sent")

    transport = GuardedTransport(
        allow_hosts=frozenset(), resolve=resolve, inner=httpx.MockTransport(answer)
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(WebhookRefused, match="resolves to"):
            await client.post("https://rebind.example.com/in", content=b"{}")


def _sender(answer: httpx.MockTransport, *, secret: str | None = SECRET) -> WebhookSender:
    async def resolve(host: str, port: int) -> list[str]:
        return ["10.9.9.9"] if host == "internal.example.com" else ["93.184.215.14"]

    transport = GuardedTransport(allow_hosts=frozenset(), resolve=resolve, inner=answer)
    return WebhookSender(
        httpx.AsyncClient(transport=transport),
        secret_for=lambda key: secret,
        delivery_max_s=60,
        clock=lambda: NOW,
    )


@pytest.mark.parametrize(
    ("status", "body", "secret", "outcome"),
    [
        (200, event(), SECRET, DeliveryOutcome.DELIVERED),
        (500, event(), SECRET, DeliveryOutcome.RETRY),
        (200, event(age_s=61), SECRET, DeliveryOutcome.UNDELIVERABLE),
        (200, event(), None, DeliveryOutcome.UNDELIVERABLE),
        (200, event("https://internal.example.com/h"), SECRET, DeliveryOutcome.UNDELIVERABLE),
        (200, event(None), SECRET, DeliveryOutcome.NONE),
    ],
    ids=["delivered", "500-retried", "too-late", "no-secret", "private-address", "no-webhook"],
)
async def test_delivery_outcomes(
    status: int, body: bytes, secret: str | None, outcome: DeliveryOutcome
) -> None:
    """2xx delivers, other answers retry; too late, unsigned or refused is given up."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(status)

    sender = _sender(httpx.MockTransport(answer), secret=secret)
    delivery = await sender.deliver(body)
    await sender.close()
    assert delivery.outcome is outcome
    if outcome in (DeliveryOutcome.DELIVERED, DeliveryOutcome.RETRY):
        assert sent[0].content == body
        assert sent[0].headers["webhook-id"] == "ukV6JbVIt7GX_yoGnqAYwg"
    else:
        assert not sent


def test_read_event_from_a_push_envelope() -> None:
    """The event is the push message's base64 data; anything else is refused."""
    data = event()
    envelope = {"message": {"data": base64.b64encode(data).decode(), "messageId": "1"}}
    assert read_event(envelope) == data
    with pytest.raises(InvalidRequest):
        read_event({"message": {}})
