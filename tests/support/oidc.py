"""Google-shaped OIDC ID tokens for tests: a throwaway RSA key, a self-signed certificate,
a loopback server that serves `{kid: PEM}` like https://www.googleapis.com/oauth2/v1/certs.

Nothing here reaches Google: the worker under test is pointed at the loopback server
with PUSH_CERTS_URL.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt
from google.auth import jwt as google_jwt

AUDIENCE = "https://worker.example.test/"
SERVICE_ACCOUNT = "push-invoker@test-project.iam.gserviceaccount.com"
ISSUER = "https://accounts.google.com"


@dataclass
class SigningKey:
    """An RSA key with a key id and a self-signed certificate for it."""

    kid: str
    private_pem: str
    cert_pem: str

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        """A fresh 2048-bit key (about 0.1 s)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test-{kid}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256())
        )
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cls(
            kid=kid,
            private_pem=private_pem,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        )

    def mint(self, **overrides: Any) -> str:
        """An ID token as Pub/Sub sends it; any claim may be overridden (None drops it)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "azp": "1234567890",
            "sub": "1234567890",
            "email": SERVICE_ACCOUNT,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        signer = crypt.RSASigner.from_string(self.private_pem, key_id=self.kid)
        token: bytes = google_jwt.encode(signer, claims)
        return token.decode()


@dataclass
class CertsServer:
    """A loopback HTTP server answering GET with the certificates JSON.

    Attributes:
        certs: What it serves, `{kid: PEM}`; may be changed while it runs.
        max_age_s: Sent as `Cache-Control: public, max-age=N`.
        hits: Requests answered so far.
        fail: Answer 500 instead while True.
    """

    certs: dict[str, str]
    max_age_s: int = 3600
    hits: int = 0
    fail: bool = False
    url: str = ""
    _server: http.server.ThreadingHTTPServer | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def running(self) -> Iterator[CertsServer]:
        """Serve on a free loopback port until the block ends."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                if owner.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps(owner.certs).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Cache-Control", f"public, max-age={owner.max_age_s}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output quiet

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
