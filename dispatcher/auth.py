"""Who may call the services: Pub/Sub's OIDC push tokens and the ingress's API keys.

The worker checks that every push carries an ID token that Google signed for this
service's audience and for the push subscription's service account
(https://cloud.google.com/pubsub/docs/authenticate-push-subscriptions). Google's
signing certificates are fetched in a thread (the fetch blocks) behind a lock, and
cached for as long as the response's `Cache-Control: max-age` allows.

The ingress may require API keys, held only as SHA-256 hashes and compared in
constant time; a key's name is the caller's id that owns its jobs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
from google.auth import exceptions as google_auth_exceptions
from google.auth import jwt as google_jwt

from dispatcher.errors import ConfigError, DispatcherError
from dispatcher.settings import GOOGLE_CERTS_URL
from dispatcher.tenants import NO_POLICY, KeyPolicy, parse_policy

log = logging.getLogger(__name__)

# The two spellings Google puts in `iss` (google.oauth2.id_token._GOOGLE_ISSUERS).
GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
CLOCK_SKEW_S = 10  # tolerated difference between Google's clock and ours
MAX_TOKEN_CHARS = 4096  # Google ID tokens are ~1 KiB; anything far larger is not one
CERTS_TTL_DEFAULT_S = 300.0  # when the response says nothing about caching
# A floor, so a `max-age=0` (or a flood of tokens naming unknown keys) cannot make
# every push fetch again, and a ceiling, so a key Google withdrew is dropped in a day.
CERTS_TTL_MIN_S = 60.0
CERTS_TTL_MAX_S = 24 * 3600.0
CERTS_FETCH_TIMEOUT_S = 10.0


class AuthError(DispatcherError):
    """The request could not be authenticated."""

    http_status = 401


class Unauthenticated(AuthError):
    """The request carries no valid credential."""

    http_status = 401


class PermissionDenied(AuthError):
    """The credential is valid but not allowed here."""

    http_status = 403


class CertsUnavailable(AuthError):
    """Google's signing certificates could not be fetched; try again later."""

    http_status = 503


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchedCerts:
    """One answer of the certificates endpoint.

    Attributes:
        certs: Key id to PEM certificate, as Google's v1 endpoint serves them.
        max_age_s: How long the answer may be cached, None when it does not say.
    """

    certs: Mapping[str, str]
    max_age_s: float | None


CertsFetcher = Callable[[str], FetchedCerts]


def fetch_certs(url: str) -> FetchedCerts:
    """Fetch `{key id: PEM certificate}` from `url` (blocking: call it in a thread).

    Raises:
        CertsUnavailable: the endpoint failed or answered something else.
    """
    try:
        with httpx.Client(timeout=CERTS_FETCH_TIMEOUT_S, trust_env=False) as client:
            response = client.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        doc = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise CertsUnavailable(f"could not fetch {url}: {type(exc).__name__}") from exc
    if (
        not isinstance(doc, dict)
        or not doc
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items())
    ):
        raise CertsUnavailable(f"{url} did not answer a JSON object of key id to certificate")
    return FetchedCerts(certs=dict(doc), max_age_s=cache_max_age(response.headers))


def cache_max_age(headers: Mapping[str, str]) -> float | None:
    """Seconds a response may be reused: `Cache-Control: max-age` less `Age`.

    Returns:
        0 for `no-store`/`no-cache`, None when the headers say nothing usable.
    """
    directives = [d.strip().lower() for d in headers.get("cache-control", "").split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for directive in directives:
        name, _, value = directive.partition("=")
        if name.strip() == "max-age":
            value = value.strip().strip('"')
            if not value.isdigit():
                return None
            age = headers.get("age", "").strip()
            return max(0.0, float(int(value) - (int(age) if age.isdigit() else 0)))
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class PushIdentity:
    """The verified sender of a push request."""

    email: str
    subject: str


class PushVerifier:
    """Checks Pub/Sub push requests' OIDC tokens against Google's certificates.

    401 (`Unauthenticated`) for a missing, malformed, forged, expired token or one
    for another audience or issuer; 403 (`PermissionDenied`) for a genuine Google
    token of another account, or an unverified email.
    """

    def __init__(
        self,
        *,
        audience: str,
        service_account: str,
        certs_url: str = GOOGLE_CERTS_URL,
        fetch: CertsFetcher = fetch_certs,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audience = audience
        self.service_account = service_account
        self.certs_url = certs_url
        self._fetch = fetch
        self._monotonic = monotonic
        self._certs: Mapping[str, str] = {}
        self._fresh_until = -math.inf
        self._fetched_at = -math.inf
        self._lock = asyncio.Lock()
        self.fetches = 0  # successful fetches, for tests and diagnostics

    async def verify(self, authorization: str | None) -> PushIdentity:
        """Verify a request's `Authorization` header.

        Args:
            authorization: The header's value, None when absent.

        Returns:
            Who sent the push.

        Raises:
            Unauthenticated: no valid token for this audience.
            PermissionDenied: a valid token, but not of the push service account.
            CertsUnavailable: the certificates could not be fetched and none are cached.
        """
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated(
                "missing Authorization header" if not authorization else "not a Bearer token"
            )
        segments = _segments(token)
        if segments is None:
            raise Unauthenticated("malformed token")
        header, claims = segments
        kid = header.get("kid")
        if header.get("alg") != "RS256" or not isinstance(kid, str) or not kid:
            # Google signs ID tokens with RS256 and names the key; refuse any other
            # algorithm before a library is asked to pick a verifier for it.
            raise Unauthenticated("token is not RS256-signed with a key id")
        cert = await self._cert_for(kid)
        if cert is None:
            raise Unauthenticated("token signed by an unknown key")
        try:
            # Signature, iat/exp and aud; google-auth's jwt module has no annotations.
            verified: Mapping[str, Any] = google_jwt.decode(  # type: ignore[no-untyped-call]
                token, certs={kid: cert}, audience=self.audience, clock_skew_in_seconds=CLOCK_SKEW_S
            )
        except (google_auth_exceptions.GoogleAuthError, ValueError, TypeError):
            # The library's messages quote the token; say why in our own words.
            raise Unauthenticated(self._why_rejected(claims)) from None
        if verified.get("iss") not in GOOGLE_ISSUERS:
            raise Unauthenticated("token not issued by Google")
        email = verified.get("email")
        if email != self.service_account:
            raise PermissionDenied(f"token of {str(email)[:100]!r}, not the push service account")
        if verified.get("email_verified") is not True:
            raise PermissionDenied("token's email is not verified")
        return PushIdentity(email=email, subject=str(verified.get("sub", "")))

    async def _cert_for(self, kid: str) -> str | None:
        """The certificate of `kid`, fetching when the cache is stale or lacks it."""
        now = self._monotonic()
        if self._needs_fetch(kid, now):
            async with self._lock:
                # Another request may have fetched while this one waited for the lock.
                now = self._monotonic()
                if self._needs_fetch(kid, now):
                    await self._refresh(now)
        return self._certs.get(kid)

    def _needs_fetch(self, kid: str, now: float) -> bool:
        if now >= self._fresh_until:
            return True
        # A new key may appear before the cache expires; look again, but not more
        # often than the floor, or a stream of made-up key ids would become fetches.
        return kid not in self._certs and now - self._fetched_at >= CERTS_TTL_MIN_S

    async def _refresh(self, now: float) -> None:
        try:
            fetched = await asyncio.to_thread(self._fetch, self.certs_url)
        except CertsUnavailable as exc:
            if not self._certs:
                raise
            # Keep the previous certificates for a while: Google publishes keys long
            # before and after it signs with them.
            log.warning(
                "could not refresh Google's certificates; using cached ones",
                extra={"reason": str(exc)},
            )
            self._fresh_until = now + CERTS_TTL_MIN_S
            self._fetched_at = now
            return
        self.fetches += 1
        ttl = CERTS_TTL_DEFAULT_S if fetched.max_age_s is None else fetched.max_age_s
        self._certs = dict(fetched.certs)
        self._fetched_at = now
        self._fresh_until = now + min(max(ttl, CERTS_TTL_MIN_S), CERTS_TTL_MAX_S)

    def _why_rejected(self, claims: Mapping[str, Any]) -> str:
        """A reason for a token the library refused (claims are unverified here)."""
        now = time.time()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            return "token lacks exp or iat"
        if exp + CLOCK_SKEW_S < now:
            return "token expired"
        if iat - CLOCK_SKEW_S > now:
            return "token issued in the future"
        if claims.get("aud") != self.audience:
            return "token is for another audience"
        return "token signature does not verify"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, None otherwise."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _segments(token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """The unverified header and claims of a JWT, None when it is not one."""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        return None
    encoded_header, encoded_claims, _ = token.split(".")
    try:
        header = json.loads(_b64url(encoded_header))
        claims = json.loads(_b64url(encoded_claims))
    except (binascii.Error, ValueError, RecursionError):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# --- API keys -------------------------------------------------------------------------

_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True)
class ApiKeyStore:
    """The ingress's API keys: a name and the SHA-256 of each key, never the key.

    The file behind it (`API_KEYS_FILE`) has one `name:sha256hex` a line, optionally
    followed by the key's policy as `name=value` words (`dispatcher.tenants`); blank
    lines and lines starting with `#` are skipped. Make an entry with
    `printf %s "$KEY" | sha256sum`.
    """

    entries: tuple[tuple[str, bytes], ...]
    policies: Mapping[str, KeyPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ApiKeyStore:
        """Read the file's text.

        Raises:
            ConfigError: naming API_KEYS_FILE and the line (never quoting it: a
                line may hold a key pasted by mistake).
        """
        entries: list[tuple[str, bytes]] = []
        policies: dict[str, KeyPolicy] = {}
        names: set[str] = set()
        digests: set[bytes] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, rest = (part.strip() for part in line.partition(":"))
            digest_hex, *words = rest.split() or [""]
            if not sep or not _KEY_NAME.match(name) or not _SHA256_HEX.match(digest_hex):
                raise ConfigError(
                    "API_KEYS_FILE",
                    f"line {number} is not 'name:sha256hex' (name: up to 64 of A-Z a-z 0-9 . _ "
                    '@ -; the hash: 64 hex digits, from: printf %s "$KEY" | sha256sum)',
                )
            digest = bytes.fromhex(digest_hex)
            if name in names:
                raise ConfigError("API_KEYS_FILE", f"line {number}: the name {name!r} repeats")
            if digest in digests:
                raise ConfigError("API_KEYS_FILE", f"line {number}: the same key appears twice")
            try:
                policies[name] = parse_policy(words)
            except ValueError as exc:
                raise ConfigError("API_KEYS_FILE", f"line {number} ({name}): {exc}") from None
            names.add(name)
            digests.add(digest)
            entries.append((name, digest))
        if not entries:
            raise ConfigError("API_KEYS_FILE", "holds no keys")
        return cls(tuple(entries), MappingProxyType(policies))

    @classmethod
    def load(cls, path: str) -> ApiKeyStore:
        """Read and parse the keys file.

        Raises:
            ConfigError: the file cannot be read or is malformed.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError("API_KEYS_FILE", f"cannot read {path!r}: {reason}") from None
        return cls.parse(text)

    @property
    def names(self) -> tuple[str, ...]:
        """The callers' names."""
        return tuple(name for name, _ in self.entries)

    def identify(self, presented: str) -> str | None:
        """The name of the key presented, None when it is not one of ours.

        Every stored hash is compared in constant time, so neither the answer's
        timing nor where a match sits tells anything about the keys.
        """
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        match: str | None = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored):
                match = name
        return match

    def policy(self, name: str | None) -> KeyPolicy:
        """The key's policy (no limits for a key without one, or with keys off)."""
        return self.policies.get(name, NO_POLICY) if name is not None else NO_POLICY

    def __repr__(self) -> str:
        return f"ApiKeyStore(names={list(self.names)!r})"


class KeyRing:
    """The keys file as it stands: re-read when it changes (looked at most once a
    second) or on `reload()` (the ingress calls it on SIGHUP), without a restart.

    A file that no longer parses is refused with an error in the log and the keys
    read before stay in force, so a bad edit never locks every caller out.
    """

    RECHECK_S = 1.0

    def __init__(self, path: str, keys: ApiKeyStore, mtime: float | None) -> None:
        self._path = path
        self._keys = keys
        self._mtime = mtime
        self._checked = time.monotonic()

    @classmethod
    def load(cls, path: str) -> KeyRing:
        """Read the file at start-up.

        Raises:
            ConfigError: it cannot be read or is malformed.
        """
        keys = ApiKeyStore.load(path)
        return cls(path, keys, _mtime(path))

    @property
    def current(self) -> ApiKeyStore:
        """The keys in force (re-read first if the file changed since the last look)."""
        now = time.monotonic()
        if now - self._checked >= self.RECHECK_S:
            self._checked = now
            if _mtime(self._path) != self._mtime:
                self.reload()
        return self._keys

    def reload(self) -> bool:
        """Read the file again; whether the new keys are now in force."""
        mtime = _mtime(self._path)
        try:
            keys = ApiKeyStore.load(self._path)
        except ConfigError as exc:
            log.error(
                "API keys file not reloaded; the keys read before stay", extra={"reason": str(exc)}
            )
            self._mtime = mtime  # not retried until it changes again
            return False
        self._keys, self._mtime = keys, mtime
        log.info("API keys reloaded", extra={"keys": len(keys.entries)})
        return True


def _mtime(path: str) -> float | None:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return None
