"""Push authentication (OIDC ID tokens, cached certificates) and the ingress's API keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from dispatcher.auth import (
    CERTS_TTL_MIN_S,
    ApiKeyStore,
    CertsUnavailable,
    FetchedCerts,
    KeyRing,
    PermissionDenied,
    PushVerifier,
    Unauthenticated,
    cache_max_age,
)
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings
from ingress.security import ApiKeyAuth, security_middleware
from tests.conftest import base_env
from tests.support.oidc import AUDIENCE, SERVICE_ACCOUNT, SigningKey

# --- OIDC push tokens ---------------------------------------------------------------


@pytest.fixture(scope="module")
def google_key() -> SigningKey:
    """The key the fake Google signs with."""
    return SigningKey.generate("key-1")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    """A key Google never published."""
    return SigningKey.generate("key-1")  # same kid: only the signature can tell


class FakeClock:
    """A monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeCerts:
    """Stands in for the certificates endpoint; counts fetches."""

    def __init__(self, certs: dict[str, str], max_age_s: float | None = 3600) -> None:
        self.certs = certs
        self.max_age_s = max_age_s
        self.fetches = 0
        self.fail = False

    def __call__(self, url: str) -> FetchedCerts:
        self.fetches += 1
        if self.fail:
            raise CertsUnavailable("could not fetch: ConnectError")
        return FetchedCerts(certs=dict(self.certs), max_age_s=self.max_age_s)


@pytest.fixture
def verifier_factory(
    google_key: SigningKey,
) -> Callable[..., tuple[PushVerifier, FakeCerts, FakeClock]]:
    """Builds a verifier over fake certificates and a hand-driven clock."""

    def make(max_age_s: float | None = 3600) -> tuple[PushVerifier, FakeCerts, FakeClock]:
        certs = FakeCerts({google_key.kid: google_key.cert_pem}, max_age_s)
        clock = FakeClock()
        verifier = PushVerifier(
            audience=AUDIENCE,
            service_account=SERVICE_ACCOUNT,
            certs_url="https://certs.invalid/",
            fetch=certs,
            monotonic=clock,
        )
        return verifier, certs, clock

    return make


async def test_valid_token_is_accepted(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """A token Google signed for our audience and push account passes."""
    verifier, _, _ = verifier_factory()
    identity = await verifier.verify(f"Bearer {google_key.mint()}")
    assert identity.email == SERVICE_ACCOUNT


@pytest.mark.parametrize("issuer", ["accounts.google.com", "https://accounts.google.com"])
async def test_both_issuer_spellings_are_accepted(
    verifier_factory: Callable[..., Any], google_key: SigningKey, issuer: str
) -> None:
    """Google writes `iss` with and without the scheme; both are Google."""
    verifier, _, _ = verifier_factory()
    identity = await verifier.verify(f"Bearer {google_key.mint(iss=issuer)}")
    assert identity.email == SERVICE_ACCOUNT


@dataclass(frozen=True)
class FromNow:
    """A time claim relative to when the test runs (not to when pytest collected it)."""

    seconds: int


def _claims(**overrides: Any) -> dict[str, Any]:
    return overrides


def _resolved(claims: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    return {k: now + v.seconds if isinstance(v, FromNow) else v for k, v in claims.items()}


@pytest.mark.parametrize(
    ("claims", "error", "words"),
    [
        (_claims(aud="https://other.example/"), Unauthenticated, "another audience"),
        (_claims(iss="https://evil.example"), Unauthenticated, "not issued by Google"),
        (
            _claims(exp=FromNow(-120), iat=FromNow(-4000)),
            Unauthenticated,
            "expired",
        ),
        (_claims(iat=FromNow(600)), Unauthenticated, "future"),
        (_claims(exp=None), Unauthenticated, "exp or iat"),
        (_claims(email="someone@evil.example"), PermissionDenied, "not the push service account"),
        (_claims(email=None), PermissionDenied, "not the push service account"),
        (_claims(email_verified=False), PermissionDenied, "not verified"),
        (_claims(email_verified="true"), PermissionDenied, "not verified"),
    ],
)
async def test_token_with_wrong_claims_is_refused(
    verifier_factory: Callable[..., Any],
    google_key: SigningKey,
    claims: dict[str, Any],
    error: type[Exception],
    words: str,
) -> None:
    """Wrong audience/issuer/expiry is 401; a genuine token of another account is 403."""
    verifier, _, _ = verifier_factory()
    with pytest.raises(error, match=words):
        await verifier.verify(f"Bearer {google_key.mint(**_resolved(claims))}")


async def test_token_signed_by_another_key_is_refused(
    verifier_factory: Callable[..., Any], other_key: SigningKey
) -> None:
    """Same key id, claims all right, but not Google's signature: 401."""
    verifier, _, _ = verifier_factory()
    with pytest.raises(Unauthenticated, match="signature"):
        await verifier.verify(f"Bearer {other_key.mint()}")


async def test_tampered_claims_are_refused(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """Claims changed after signing (another email) break the signature."""
    verifier, _, _ = verifier_factory()
    header, _, signature = google_key.mint().split(".")
    _, tampered, _ = google_key.mint(email="someone@evil.example").split(".")
    with pytest.raises(Unauthenticated, match="signature"):
        await verifier.verify(f"Bearer {header}.{tampered}.{signature}")


def _b64(doc: dict[str, Any]) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("authorization", "words"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic dXNlcjpwYXNz", "not a Bearer"),
        ("Bearer", "not a Bearer"),
        ("Bearer    ", "not a Bearer"),
        ("Bearer abc", "malformed"),
        ("Bearer a.b.c", "malformed"),
        ("Bearer " + "a" * 5000, "malformed"),
        ("Bearer ..", "malformed"),
        (f"Bearer {_b64({'alg': 'none', 'kid': 'key-1'})}.{_b64({'aud': AUDIENCE})}.", "RS256"),
        (
            f"Bearer {_b64({'alg': 'HS256', 'kid': 'key-1'})}.{_b64({'aud': AUDIENCE})}.c2ln",
            "RS256",
        ),
        (f"Bearer {_b64({'alg': 'RS256'})}.{_b64({'aud': AUDIENCE})}.c2ln", "key id"),
        (f"Bearer {_b64({'alg': 'RS256', 'kid': 'nope'})}.{_b64({})}.c2ln", "unknown key"),
        (f"Bearer {_b64({'alg': 'RS256', 'kid': 'key-1'})}.{_b64({})}.c2ln", "exp or iat"),
        ("Bearer W10.W10.W10", "malformed"),  # header and claims are JSON lists
    ],
)
async def test_missing_or_malformed_authorization_is_refused(
    verifier_factory: Callable[..., Any], authorization: str | None, words: str
) -> None:
    """Anything but a well-formed RS256 JWT from a known key is 401, with the reason."""
    verifier, _, _ = verifier_factory()
    with pytest.raises(Unauthenticated, match=words):
        await verifier.verify(authorization)


async def test_refusal_messages_never_quote_the_token(
    verifier_factory: Callable[..., Any], other_key: SigningKey
) -> None:
    """google-auth's own messages quote the token; ours must not (they are logged)."""
    verifier, _, _ = verifier_factory()
    token = other_key.mint()
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(f"Bearer {token}")
    for segment in token.split("."):
        assert segment not in str(caught.value)


async def test_certificates_are_fetched_once_while_fresh(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """Many pushes, one fetch; after max-age a new one."""
    verifier, certs, clock = verifier_factory(max_age_s=3600)
    token = f"Bearer {google_key.mint()}"
    for _ in range(20):
        await verifier.verify(token)
    assert certs.fetches == 1
    clock.now += 3599
    await verifier.verify(token)
    assert certs.fetches == 1
    clock.now += 2
    await verifier.verify(token)
    assert certs.fetches == 2


async def test_concurrent_first_pushes_share_one_fetch(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """Pushes arriving together before any certificate is cached wait for one fetch."""
    verifier, certs, _ = verifier_factory()
    token = f"Bearer {google_key.mint()}"
    await asyncio.gather(*(verifier.verify(token) for _ in range(10)))
    assert certs.fetches == 1


@pytest.mark.parametrize("max_age_s", [0, None])
async def test_cache_lifetime_has_a_floor(
    verifier_factory: Callable[..., Any], google_key: SigningKey, max_age_s: float | None
) -> None:
    """max-age=0 (or no header) still caches for the floor: a push flood is not a fetch flood."""
    verifier, certs, clock = verifier_factory(max_age_s=max_age_s)
    token = f"Bearer {google_key.mint()}"
    await verifier.verify(token)
    clock.now += CERTS_TTL_MIN_S - 1
    await verifier.verify(token)
    assert certs.fetches == 1


async def test_unknown_key_id_refetches_at_most_once_a_minute(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """A new key id triggers a fetch (Google rotated), but made-up ids cannot force more."""
    verifier, certs, clock = verifier_factory()
    await verifier.verify(f"Bearer {google_key.mint()}")
    rotated = SigningKey.generate("key-2")
    token = f"Bearer {rotated.mint()}"
    for _ in range(5):
        with pytest.raises(Unauthenticated, match="unknown key"):
            await verifier.verify(token)
    assert certs.fetches == 1  # the first fetch was less than a minute ago
    certs.certs[rotated.kid] = rotated.cert_pem
    clock.now += CERTS_TTL_MIN_S
    await verifier.verify(token)
    assert certs.fetches == 2


async def test_fetch_failure_without_certificates_is_unavailable(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """No certificate ever fetched: 503-class error, so Pub/Sub redelivers later."""
    verifier, certs, _ = verifier_factory()
    certs.fail = True
    with pytest.raises(CertsUnavailable):
        await verifier.verify(f"Bearer {google_key.mint()}")


async def test_fetch_failure_keeps_the_cached_certificates(
    verifier_factory: Callable[..., Any], google_key: SigningKey
) -> None:
    """A failed refresh keeps serving with the certificates already known."""
    verifier, certs, clock = verifier_factory(max_age_s=100)
    token = f"Bearer {google_key.mint()}"
    await verifier.verify(token)
    certs.fail = True
    clock.now += 200
    await verifier.verify(token)
    assert certs.fetches == 2


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"cache-control": "public, max-age=19615, must-revalidate, no-transform"}, 19615.0),
        ({"cache-control": "max-age=100", "age": "30"}, 70.0),
        ({"cache-control": "max-age=10", "age": "30"}, 0.0),
        ({"cache-control": "no-store"}, 0.0),
        ({"cache-control": "private, no-cache"}, 0.0),
        ({"cache-control": "max-age=abc"}, None),
        ({}, None),
    ],
)
def test_cache_max_age_reads_cache_control(headers: dict[str, str], expected: float | None) -> None:
    """max-age less Age; no-store/no-cache mean 0; nothing usable means None."""
    assert cache_max_age(headers) == expected


# --- the worker's push endpoint -----------------------------------------------------


@pytest.fixture
def worker_client(settings_factory: Callable[..., Settings], google_key: SigningKey) -> TestClient:
    """The worker app with push auth on, without its lifespan: no runtime exists, so a
    request that got past authentication could not run anything without failing loudly."""
    from worker.app import create_app

    settings = settings_factory(
        FIRESTORE_COLLECTION="jobs",
        FIRESTORE_DATABASE="(default)",
        PUBSUB_TOPIC="jobs-topic",
        PUSH_AUDIENCE=AUDIENCE,
        PUSH_SERVICE_ACCOUNT=SERVICE_ACCOUNT,
    )
    app = create_app(settings)
    app.state.push_verifier = PushVerifier(
        audience=AUDIENCE,
        service_account=SERVICE_ACCOUNT,
        fetch=FakeCerts({google_key.kid: google_key.cert_pem}),
    )
    # Not entered as a context manager: the lifespan (and so the runtime) never starts.
    return TestClient(app, raise_server_exceptions=False)


def test_push_without_token_is_401_in_the_error_shape(worker_client: TestClient) -> None:
    """No token: 401 with WWW-Authenticate and the documented body."""
    response = worker_client.post("/", json={"message": {"attributes": {"job_id": "x" * 22}}})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["status"] == "UNAUTHENTICATED"
    assert "missing Authorization" in response.json()["error"]["message"]


def test_push_of_another_account_is_403(worker_client: TestClient, google_key: SigningKey) -> None:
    """A genuine Google token of another service account: 403."""
    token = google_key.mint(email="other@test-project.iam.gserviceaccount.com")
    response = worker_client.post("/", headers={"Authorization": f"Bearer {token}"}, json={})
    assert response.status_code == 403
    assert response.json()["error"]["status"] == "PERMISSION_DENIED"


def test_worker_healthz_needs_no_token(worker_client: TestClient) -> None:
    """Health checks are not pushes."""
    assert worker_client.get("/healthz").status_code == 200


# --- settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PUSH_AUDIENCE": AUDIENCE}, "PUSH_SERVICE_ACCOUNT"),
        ({"PUSH_SERVICE_ACCOUNT": SERVICE_ACCOUNT}, "PUSH_AUDIENCE"),
        (
            {"PUSH_AUDIENCE": AUDIENCE, "PUSH_SERVICE_ACCOUNT": "not-an-email"},
            "PUSH_SERVICE_ACCOUNT",
        ),
        ({"PUSH_CERTS_URL": "http://certs.example.com/"}, "PUSH_CERTS_URL"),
        ({"PUSH_CERTS_URL": "ftp://127.0.0.1/"}, "PUSH_CERTS_URL"),
    ],
)
def test_bad_security_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    """Half a push-auth configuration or an insecure certs URL stop the service at
    start-up, naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(base_env(**env))
    assert caught.value.variable == variable


def test_security_settings_are_parsed() -> None:
    """Both push settings together, a loopback http certs URL, and a keys file."""
    settings = Settings.from_env(
        base_env(
            PUSH_AUDIENCE=AUDIENCE,
            PUSH_SERVICE_ACCOUNT=SERVICE_ACCOUNT,
            PUSH_CERTS_URL="http://127.0.0.1:9/certs",
        )
    )
    assert settings.push_audience == AUDIENCE
    assert settings.push_certs_url == "http://127.0.0.1:9/certs"
    assert settings.api_keys_file is None


# --- API keys -----------------------------------------------------------------------


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_FILE = f"""
# name:sha256 of the key
alice:{_sha("alice-secret-key")}
bob : {_sha("bob-secret-key").upper()}
"""


def test_keys_file_identifies_each_key_by_name() -> None:
    """Each key maps to its name; unknown keys and near misses to nothing."""
    store = ApiKeyStore.parse(KEYS_FILE)
    assert store.names == ("alice", "bob")
    assert store.identify("alice-secret-key") == "alice"
    assert store.identify("bob-secret-key") == "bob"
    assert store.identify("alice-secret-key ") is None
    assert store.identify("") is None
    assert store.identify(_sha("alice-secret-key")) is None  # the hash is not the key


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "holds no keys"),
        ("# only a comment\n", "holds no keys"),
        ("my-raw-secret-key\n", "line 1 is not"),
        (f"alice:{_sha('a')}\nalice:{_sha('b')}\n", "line 2: the name 'alice' repeats"),
        (f"alice:{_sha('a')}\nbob:{_sha('a')}\n", "line 2: the same key appears twice"),
        ("alice:abc123\n", "line 1 is not"),
        (f"al ice:{_sha('a')}\n", "line 1 is not"),
    ],
)
def test_malformed_keys_file_is_refused_without_quoting_it(text: str, words: str) -> None:
    """The message names API_KEYS_FILE and the line, never the line's content."""
    with pytest.raises(ConfigError) as caught:
        ApiKeyStore.parse(text)
    assert caught.value.variable == "API_KEYS_FILE"
    assert words in str(caught.value)
    assert "my-raw-secret-key" not in str(caught.value)


def test_keys_file_is_loaded_when_the_guards_are_built(tmp_path: Path) -> None:
    """API_KEYS_FILE is read by the ingress's guards at start-up; the keys' repr shows names."""
    path = tmp_path / "keys"
    path.write_text(KEYS_FILE)
    settings = Settings.from_env(base_env(API_KEYS_FILE=str(path)))
    ring = security_middleware(settings)[-1].kwargs["keys"]
    assert isinstance(ring, KeyRing)
    keys = ring.current
    assert isinstance(keys, ApiKeyStore) and keys.names == ("alice", "bob")
    assert _sha("alice-secret-key") not in repr(keys)


def test_missing_keys_file_stops_the_start_naming_the_variable() -> None:
    """Parsing settings reads no file; building the guards fails, naming API_KEYS_FILE."""
    settings = Settings.from_env(base_env(API_KEYS_FILE="/nonexistent/keys"))
    with pytest.raises(ConfigError) as caught:
        security_middleware(settings)
    assert caught.value.variable == "API_KEYS_FILE"


def _echo_caller_app(keys: ApiKeyStore | None) -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"caller": getattr(request.state, "caller", None)})

    settings = Settings.from_env(base_env())
    middleware = security_middleware(settings)
    if keys is not None:
        from starlette.middleware import Middleware

        middleware.append(Middleware(ApiKeyAuth, keys=keys))
    return Starlette(
        routes=[Route("/whoami", whoami), Route("/healthz", whoami)], middleware=middleware
    )


@pytest.mark.parametrize(
    ("headers", "status", "caller"),
    [
        ({"X-API-Key": "alice-secret-key"}, 200, "alice"),
        ({"Authorization": "Bearer bob-secret-key"}, 200, "bob"),
        ({"Authorization": "bearer bob-secret-key"}, 200, "bob"),
        # Behind Cloud Run IAM, Authorization holds Google's token; X-API-Key wins.
        (
            {"X-API-Key": "alice-secret-key", "Authorization": "Bearer google-id-token"},
            200,
            "alice",
        ),
        ({}, 401, None),
        ({"X-API-Key": "wrong"}, 401, None),
        ({"Authorization": "Basic YWxpY2U6eA=="}, 401, None),
        ({"Authorization": "Bearer alice-secret-key", "X-API-Key": "wrong"}, 401, None),
    ],
)
def test_api_key_middleware_sets_the_caller_or_answers_401(
    headers: dict[str, str], status: int, caller: str | None
) -> None:
    """A known key becomes request.state.caller (its name); none or an unknown one is 401."""
    client = TestClient(_echo_caller_app(ApiKeyStore.parse(KEYS_FILE)))
    response = client.get("/whoami", headers=headers)
    assert response.status_code == status
    if status == 200:
        assert response.json() == {"caller": caller}
    else:
        assert response.json()["error"]["status"] == "UNAUTHENTICATED"
        assert "secret" not in response.text


def test_healthz_is_open_with_keys_on() -> None:
    """Health checks need no key."""
    client = TestClient(_echo_caller_app(ApiKeyStore.parse(KEYS_FILE)))
    assert client.get("/healthz").json() == {"caller": None}


def test_without_keys_there_is_no_caller() -> None:
    """Keys off: requests pass and carry no caller (jobs have no owner)."""
    client = TestClient(_echo_caller_app(None))
    assert client.get("/whoami").json() == {"caller": None}


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
        b'{"message": {"data": "' + b"9" * 5000 + b'"}}',
        b'{"message": {"attributes": {"job_id": 5}}, "deliveryAttempt": ' + b"9" * 5000 + b"}",
        b"\xff\xfe",
        b"{",
    ],
)
def test_hostile_push_bodies_are_acknowledged_not_crashed(
    settings_factory: Callable[..., Settings], body: bytes
) -> None:
    """With push auth off, a body no Pub/Sub would send is acknowledged (2xx), never a 5xx
    that Pub/Sub would redeliver forever, and nothing is run."""
    from types import SimpleNamespace

    from worker.app import create_app

    settings = settings_factory(
        FIRESTORE_COLLECTION="jobs", FIRESTORE_DATABASE="(default)", PUBSUB_TOPIC="jobs-topic"
    )
    app = create_app(settings)
    app.state.runtime = SimpleNamespace(executor=object())  # any use would raise
    client = TestClient(app, raise_server_exceptions=False)
    response = client.post("/", content=body)
    assert response.status_code == 200, response.text
    assert response.json()["acknowledged"] is True
