"""Security, end to end with real processes: push tokens at the worker, API keys and
hostile input at the ingress, quiet logs, and the OpenAPI document against the real app.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.oidc import AUDIENCE, SERVICE_ACCOUNT, CertsServer, SigningKey
from tests.support.stack import MODEL, REGIONS, TERMINAL, Stack, prompt, unique

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SPEC = json.loads((ROOT / "ingress" / "openapi.json").read_text())
KEYS = {"alice": "alice-" + "a" * 40, "bob": "bob-" + "b" * 40}
FUZZ_REQUESTS = 1000


def keys_file(tmp_path: Path) -> str:
    """An API_KEYS_FILE for alice and bob (hashes only, as documented)."""
    path = tmp_path / "api-keys"
    lines = [f"{name}:{hashlib.sha256(key.encode()).hexdigest()}" for name, key in KEYS.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def as_(name: str) -> dict[str, str]:
    """Headers presenting a caller's key."""
    return {"X-API-Key": KEYS[name]}


def wait_terminal(stack: Stack, job_id: str, headers: dict[str, str], timeout: float = 60) -> str:
    """Poll a job until it is terminal; its final status."""
    deadline = time.monotonic() + timeout
    while True:
        response = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        status = str(response.json()["status"])
        if status in TERMINAL:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.05)


# --- push authentication at the worker ----------------------------------------------


@pytest.fixture(scope="module")
def google_key() -> SigningKey:
    """The key the loopback 'Google' signs push tokens with."""
    return SigningKey.generate("test-key-1")


@pytest.fixture
def certs_server(google_key: SigningKey) -> Iterator[CertsServer]:
    """Google's certificate endpoint, on loopback."""
    with CertsServer({google_key.kid: google_key.cert_pem}).running() as server:
        yield server


def push_envelope(job_id: str) -> dict[str, Any]:
    """A push body as Pub/Sub sends it."""
    return {
        "message": {"attributes": {"job_id": job_id}, "data": "", "messageId": "1"},
        "subscription": "projects/test-project/subscriptions/push",
    }


def test_worker_runs_only_pushes_with_a_valid_google_token(
    stack_factory: Callable[..., Stack], certs_server: CertsServer, google_key: SigningKey
) -> None:
    """Every bad token is refused (401/403) with nothing executed; a valid one runs the job."""
    stack = stack_factory(
        "pubsub",
        PUSH_AUDIENCE=AUDIENCE,
        PUSH_SERVICE_ACCOUNT=SERVICE_ACCOUNT,
        PUSH_CERTS_URL=certs_server.url,
    )
    assert stack.worker is not None
    text = unique("push-auth")
    job_id = stack.submit_ok(text)
    # The emulator's own pushes carry no token: refused, so the job must stay pending.
    time.sleep(1.0)
    assert stack.job(job_id)["status"] == "pending"

    now = int(time.time())
    forger = SigningKey.generate(google_key.kid)
    header_cases = {
        "missing header": None,
        "malformed header": "Bearer not-a-jwt",
        "not bearer": "Basic dXNlcjpwYXNz",
        "bad signature": f"Bearer {forger.mint()}",
        "wrong audience": f"Bearer {google_key.mint(aud='https://elsewhere.example/')}",
        "wrong issuer": f"Bearer {google_key.mint(iss='https://evil.example')}",
        "expired": f"Bearer {google_key.mint(iat=now - 7200, exp=now - 3600)}",
        "wrong email": f"Bearer {google_key.mint(email='intruder@evil.iam.gserviceaccount.com')}",
        "unverified email": f"Bearer {google_key.mint(email_verified=False)}",
    }
    expected = {"wrong email": 403, "unverified email": 403}
    url = f"{stack.worker.url}/"
    for case, authorization in header_cases.items():
        headers = {} if authorization is None else {"Authorization": authorization}
        response = stack.http.post(url, json=push_envelope(job_id), headers=headers)
        assert response.status_code == expected.get(case, 401), (case, response.text)
        assert response.json()["error"]["code"] == response.status_code, case
    assert stack.standin_stats()["calls_by_text"].get(text) is None, "a refused push ran"
    assert stack.job(job_id)["status"] == "pending"

    token = google_key.mint()
    response = stack.http.post(
        url, json=push_envelope(job_id), headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200, response.text
    assert stack.job(job_id)["status"] == "succeeded"
    assert stack.standin_stats()["calls_by_text"][text] == 1
    # Certificates were fetched once for all those tokens (cached per max-age).
    assert certs_server.hits == 1
    log = stack.worker.log_text()
    assert "PUSH AUTHENTICATION IS OFF" not in log
    assert token.split(".")[2] not in log and forger.mint().split(".")[0] not in log


def test_worker_warns_once_when_push_auth_is_off(stack_factory: Callable[..., Stack]) -> None:
    """Without PUSH_AUDIENCE/PUSH_SERVICE_ACCOUNT the worker still works but says so, once."""
    stack = stack_factory("pubsub")
    assert stack.worker is not None
    job_id = stack.submit_ok(unique("no-auth"))
    assert stack.wait(job_id)["status"] == "succeeded"
    warnings = [
        json.loads(line)
        for line in stack.worker.log_text().splitlines()
        if "PUSH AUTHENTICATION IS OFF" in line
    ]
    assert len(warnings) == 1 and warnings[0]["severity"] == "WARNING"


# --- API keys -------------------------------------------------------------------------


def test_api_keys_isolate_callers(stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    """The creator reads its job; another key gets 404 (never 403); no or a bad key gets 401."""
    stack = stack_factory("memory", API_KEYS_FILE=keys_file(tmp_path))
    url = stack.ingress.url
    created = stack.submit(prompt(unique("mine")), headers=as_("alice"))
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    assert wait_terminal(stack, job_id, as_("alice")) == "succeeded"

    other = stack.http.get(f"{url}/jobs/{job_id}", headers=as_("bob"))
    missing = stack.http.get(f"{url}/jobs/{'x' * 22}", headers=as_("bob"))
    assert other.status_code == 404
    assert other.json()["error"]["message"] == missing.json()["error"]["message"].replace(
        "x" * 22, job_id
    ), "another caller's job must read exactly like no job"
    assert stack.http.delete(f"{url}/jobs/{job_id}", headers=as_("bob")).status_code == 404

    for headers in ({}, {"X-API-Key": "not-a-key"}, {"Authorization": "Bearer not-a-key"}):
        for response in (
            stack.http.get(f"{url}/jobs/{job_id}", headers=headers),
            stack.submit(prompt("x"), headers=headers),
            stack.http.get(f"{url}/metrics", headers=headers),
        ):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["status"] == "UNAUTHENTICATED"
    assert stack.http.get(f"{url}/healthz").status_code == 200
    assert stack.http.get(f"{url}/openapi.json").status_code == 200
    # The key may also come as a bearer token.
    bearer = {"Authorization": f"Bearer {KEYS['alice']}"}
    assert stack.http.get(f"{url}/jobs/{job_id}", headers=bearer).status_code == 200


def test_idempotency_keys_are_per_caller(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """The same Idempotency-Key from two callers makes two jobs, each visible to its owner."""
    stack = stack_factory("memory", API_KEYS_FILE=keys_file(tmp_path))
    ids = {}
    for name in KEYS:
        response = stack.submit(
            prompt(f"idem-{name}"), headers={**as_(name), "Idempotency-Key": "shared"}
        )
        assert response.status_code == 202, response.text
        ids[name] = response.json()["job_id"]
    assert ids["alice"] != ids["bob"]
    assert wait_terminal(stack, ids["bob"], as_("bob")) == "succeeded"


# --- hostile input over the wire -----------------------------------------------------


def test_oversized_heads_are_refused_in_the_error_shape(
    stack_factory: Callable[..., Stack],
) -> None:
    """Long paths and query strings (414), big headers (431), over-long stored headers (400)."""
    stack = stack_factory("memory")
    url = stack.ingress.url
    cases = [
        (f"{url}/jobs/{'j' * 3000}", {}, 414),
        (f"{url}/healthz?{'q' * 3000}", {}, 414),
        (f"{url}/healthz", {"X-Big": "v" * 9000}, 431),
        (f"{url}/healthz", {f"X-H{i}": "v" * 7000 for i in range(6)}, 431),
        (f"{url}/healthz", {"X-Session-Id": "s" * 129}, 400),
    ]
    for target, headers, status in cases:
        response = stack.http.get(target, headers=headers)
        assert response.status_code == status, (target[:80], response.text[:200])
        assert response.json()["error"]["code"] == status
    pinned = {
        "contents": [{"parts": [{"text": "cached"}]}],
        "cachedContent": f"projects/p/locations/{REGIONS[0]}/cachedContents/c1",
    }
    response = stack.submit(pinned, headers={"X-Session-Id": "s" * 500})
    assert response.status_code == 400, "X-Session-Id is checked on the cache-pinned path too"


def test_numbers_and_strings_that_cannot_round_trip_are_400(
    stack_factory: Callable[..., Stack],
) -> None:
    """Huge integers, 1e999, NaN and lone surrogates are refused, not stored."""
    stack = stack_factory("memory")
    base = b'{"contents": [{"parts": [{"text": "a"}]}], "x": '
    for value in (b"9" * 5000, b"1e999", b"NaN", b'"\\udfff"'):
        response = stack.submit(None, content=base + value + b"}")
        assert response.status_code == 400, (value[:20], response.text)
        assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


# --- the OpenAPI document -----------------------------------------------------------


def test_openapi_document_is_served_and_describes_every_route(
    stack_factory: Callable[..., Stack],
) -> None:
    """GET /openapi.json serves the file in the repo, and its paths are the app's routes."""
    from starlette.routing import Route

    from dispatcher.settings import Settings
    from ingress.app import create_app

    stack = stack_factory("memory")
    served = stack.http.get(f"{stack.ingress.url}/openapi.json")
    assert served.status_code == 200
    assert served.headers["content-type"].startswith("application/json")
    assert served.json() == SPEC
    assert SPEC["openapi"].startswith("3.1")

    app = create_app(Settings.from_env(dict(stack.env)))
    routes = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    described = {
        (path, method)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert routes == described


# --- a fuzz run against the running ingress -----------------------------------------


class SchemaChecker:
    """Checks a JSON value against the subset of JSON Schema the document uses."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def problems(self, value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
        schema = self.resolve(schema)
        if "oneOf" in schema:
            matches = [s for s in schema["oneOf"] if not self.problems(value, s, where)]
            return [] if len(matches) == 1 else [f"{where}: matches {len(matches)} of oneOf"]
        kind = schema.get("type")
        types: dict[str, type | tuple[type, ...]] = {
            "object": dict,
            "array": list,
            "string": str,
            "integer": int,
            "number": (int, float),
            "boolean": bool,
        }
        if kind is not None and not isinstance(value, types[kind]):
            return [f"{where}: not {kind}"]
        found: list[str] = []
        if "enum" in schema and value not in schema["enum"]:
            found.append(f"{where}: {value!r} not in {schema['enum']}")
        if "const" in schema and value != schema["const"]:
            found.append(f"{where}: not {schema['const']!r}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            found.append(f"{where}: does not match {schema['pattern']}")
        if isinstance(value, dict):
            found += [
                f"{where}.{key}: missing" for key in schema.get("required", ()) if key not in value
            ]
            for key, sub in schema.get("properties", {}).items():
                if key in value:
                    found += self.problems(value[key], sub, f"{where}.{key}")
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                found += self.problems(item, schema["items"], f"{where}[{i}]")
        return found


class Fuzz:
    """Sends generated requests to a running ingress and checks every answer."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.client = httpx.Client(base_url=stack.ingress.url, timeout=30)
        self.checker = SchemaChecker(SPEC)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.by_operation: collections.Counter[str] = collections.Counter()
        self.jobs: dict[str, str | None] = {}  # job id -> owner (a key name)
        self.requests = 0

    def send(self, call: dict[str, Any]) -> None:
        method, path, operation = call["method"], call["path"], call["operation"]
        target_id = None
        if call["job_ref"] is not None:
            known = sorted(self.jobs)
            ref = call["job_ref"]
            target_id = known[ref % len(known)] if isinstance(ref, int) and known else str(ref)
            path = path.replace("{job_id}", quote(target_id, safe=""))
        # Bytes: a header may carry any latin-1 octet, which httpx would not encode itself.
        headers = {k: v.encode("latin-1") for k, v in call["headers"].items() if v is not None}
        owner = call["owner"]
        response = self.client.request(
            method,
            path,
            content=call["body"],
            headers=headers,
            params=call["params"],
        )
        self.requests += 1
        self.statuses[response.status_code] += 1
        self.by_operation[f"{operation} {response.status_code}"] += 1
        assert response.status_code < 500, (call, response.status_code, response.text[:500])
        self.check_documented(operation, method, response)
        if response.status_code == 202 or (
            operation == "vertex" and "x-dispatcher-job-id" in response.headers
        ):
            job_id = response.headers.get("x-dispatcher-job-id") or response.json()["job_id"]
            self.jobs.setdefault(job_id, owner)
        if target_id in self.jobs and self.jobs[target_id] != owner and owner is not None:
            # 404 as for no job; or refused before the lookup (a bad `wait`, a limit).
            assert response.status_code in (400, 404, 414, 431), "another caller's job leaked"

    def check_documented(self, operation: str, method: str, response: httpx.Response) -> None:
        status = response.status_code
        if status >= 400:
            body = response.json()
            assert not self.checker.problems(body, {"$ref": "#/components/schemas/Error"}), body
            assert body["error"]["code"] == status
        if operation in ("unknown", "wrong-method"):
            assert status in (401, 404, 405, 414, 431, 400), status
            return
        path = {
            "generate": "/generate",
            "get-job": "/jobs/{job_id}",
            "delete-job": "/jobs/{job_id}",
            "vertex": next(p for p in SPEC["paths"] if p.startswith("/{version}")),
            "healthz": "/healthz",
            "metrics": "/metrics",
            "openapi": "/openapi.json",
        }[operation]
        if operation == "vertex" and status == 404:
            return  # an unknown version/action/model: documented, bodies checked above
        documented = SPEC["paths"][path][method.lower()]["responses"]
        assert str(status) in documented or "default" in documented, (operation, status)
        spec = self.checker.resolve(documented.get(str(status), documented.get("default", {})))
        content = spec.get("content", {}).get("application/json")
        if content and response.headers.get("content-type", "").startswith("application/json"):
            problems = self.checker.problems(response.json(), content["schema"])
            assert not problems, (operation, status, problems)


# Strategies: a mix of valid requests, near misses and garbage.
_latin = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
# h11 (httpx's parser) refuses leading or trailing whitespace in a header value.
header_values = (st.text(_latin, max_size=40) | st.text(_latin, min_size=100, max_size=400)).map(
    str.strip
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
good_parts = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=40)}),
    st.fixed_dictionaries(
        {
            "inlineData": st.fixed_dictionaries(
                {"mimeType": st.just("image/png"), "data": st.just("AA==")}
            )
        }
    ),
    st.fixed_dictionaries(
        {"fileData": st.fixed_dictionaries({"fileUri": st.just("gs://bucket/object")})}
    ),
)
good_requests = st.fixed_dictionaries(
    {
        "contents": st.lists(
            st.fixed_dictionaries(
                {"parts": st.lists(good_parts, min_size=1, max_size=3)},
                optional={"role": st.sampled_from(["user", "model"])},
            ),
            min_size=1,
            max_size=3,
        )
    },
    optional={
        "generationConfig": st.fixed_dictionaries(
            {}, optional={"temperature": st.floats(0, 2), "maxOutputTokens": st.integers(1, 8192)}
        ),
        "labels": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=2),
        "systemInstruction": st.fixed_dictionaries({"parts": st.lists(good_parts, min_size=1)}),
        "cachedContent": st.just(f"projects/p/locations/{REGIONS[0]}/cachedContents/c"),
        "model": st.just(MODEL),
        "futureField": json_values,  # passed to Vertex untouched
    },
)
# Near misses: the right skeleton with any value anywhere.
loose_parts = (
    good_parts
    | json_values
    | st.dictionaries(
        st.sampled_from(["text", "inlineData", "fileData", "functionCall", "thought"]),
        json_values,
        max_size=2,
    )
)
loose_requests = st.fixed_dictionaries(
    {
        "contents": st.lists(
            st.fixed_dictionaries(
                {"parts": st.lists(loose_parts, min_size=1, max_size=3) | json_values},
                optional={"role": st.sampled_from(["user", "model"]) | json_values},
            ),
            min_size=1,
            max_size=3,
        )
        | json_values
    },
    optional={
        "generationConfig": json_values,
        "labels": st.dictionaries(st.text(max_size=10), json_values, max_size=2) | json_values,
        "systemInstruction": st.fixed_dictionaries({"parts": st.lists(loose_parts, max_size=2)})
        | json_values,
        "cachedContent": st.sampled_from(
            [
                f"projects/p/locations/{REGIONS[0]}/cachedContents/c",
                "projects/p/locations/mars-north1/cachedContents/c",
            ]
        )
        | json_values,
        "model": st.sampled_from([MODEL, "not-a-model"]) | json_values,
        "tools": json_values,
        "safetySettings": json_values,
    },
)
hostile_bodies = st.sampled_from(
    [
        b"",
        b"{",
        b"null",
        b"\xff\xfe\x00",
        b"[" * 5000 + b"]" * 5000,
        b'{"contents": [{"parts": [{"text": "a"}]}], "x": ' + b"9" * 5000 + b"}",
        b'{"contents": [{"parts": [{"text": "a"}]}], "x": 1e999}',
        b'{"contents": [{"parts": [{"text": "a"}]}], "x": NaN}',
        b'{"contents": [{"parts": [{"text": "\\ud800"}]}]}',
        b'{"contents": [{"parts": [{"text": "' + b"x" * 70_000 + b'"}]}]}',
        b'{"contents": [{"parts": [{"text": "a"}]}], "labels": {"k": {"deep": ' * 40
        + b"1"
        + b"}" * 80,
    ]
) | st.binary(max_size=64)


def _body(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    """One generated request."""
    owner = draw(st.sampled_from(["alice"] * 4 + ["bob"] * 4 + [None, "wrong"]))
    key = {"alice": KEYS["alice"], "bob": KEYS["bob"], "wrong": "wrong-key"}.get(str(owner))

    # A job made earlier in the run (picked when sent: the strategy must not depend on
    # what the server answered), or any text.
    def rare() -> bool:
        """True one time in ten: hostile header values spoil most requests."""
        return draw(st.integers(0, 9)) == 0

    any_id = st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30
    ) | st.from_regex(r"[A-Za-z0-9_-]{22}", fullmatch=True)
    job_ref: int | str = draw(st.integers(0, 10**6) | any_id)
    headers: dict[str, str | None] = {
        "X-Session-Id": draw(
            header_values if rare() else st.sampled_from([None, None, "session-a", "session-b"])
        ),
        # A few short keys, so replays (same body) and conflicts (another body) happen.
        "Idempotency-Key": draw(
            header_values if rare() else st.sampled_from([None] * 6 + ["k1", "k2"])
        ),
        "Content-Type": draw(st.sampled_from([None, "application/json", "text/plain"])),
    }
    if key is not None:
        if draw(st.booleans()):
            headers["X-API-Key"] = key
        else:
            headers["Authorization"] = f"Bearer {key}"
    operation = draw(
        st.sampled_from(
            ["generate"] * 6
            + ["get-job"] * 3
            + [
                "delete-job",
                "vertex",
                "vertex",
                "healthz",
                "metrics",
                "openapi",
                "unknown",
                "wrong-method",
            ]
        )
    )
    body: bytes | None = None
    params: dict[str, str] = {}
    method = "GET"
    path = "/healthz"
    if operation in ("generate", "vertex"):
        method = "POST"
        body = draw(
            st.one_of(
                good_requests.map(_body),
                good_requests.map(_body),
                loose_requests.map(_body),
                json_values.map(_body),
                hostile_bodies,
            )
        )
        path = "/generate"
        if operation == "vertex":
            version = draw(st.sampled_from(["v1", "v1beta1", "v2"]))
            model = draw(st.sampled_from([MODEL, MODEL, "other-model"]))
            action = draw(
                st.sampled_from(
                    ["generateContent", "generateContent", "streamGenerateContent", "countTokens"]
                )
            )
            where = "projects/p/locations/us-central1/publishers/google/models"
            path = f"/{version}/{where}/{model}:{action}"
            if draw(st.booleans()):
                params["alt"] = "sse"
    elif operation in ("get-job", "delete-job"):
        method = "GET" if operation == "get-job" else "DELETE"
        path = "/jobs/{job_id}"
        if operation == "get-job" and draw(st.booleans()):
            params["wait"] = draw(
                st.sampled_from(["0", "0.01", "-1", "abc", "nan", "inf", "1e9", ""])
            )
    elif operation == "healthz":
        path = "/healthz"
    elif operation == "metrics":
        path = "/metrics"
    elif operation == "openapi":
        path = "/openapi.json"
    elif operation == "unknown":
        method = draw(st.sampled_from(["GET", "POST", "PUT"]))
        path = "/" + quote(draw(st.text(max_size=30)), safe="/")
        if path in ("/generate", "/healthz", "/metrics", "/openapi.json") or path.startswith(
            "/jobs/"
        ):
            path = "/nothing-here"
    else:
        method = draw(st.sampled_from(["PUT", "PATCH"]))
        path = draw(st.sampled_from(["/generate", "/healthz", f"/jobs/{'a' * 22}"]))
    if draw(st.integers(0, 30)) == 0:
        params["q"] = "x" * draw(st.integers(1000, 3000))
    return {
        "operation": operation,
        "method": method,
        "path": path,
        "params": params,
        "headers": headers,
        "body": body,
        "owner": owner if owner in KEYS else None,
        "job_ref": job_ref if operation in ("get-job", "delete-job") else None,
    }


def test_fuzz_the_running_ingress(stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    """Over 1,000 generated requests: no 5xx, every status and body as documented, another
    caller's job always 404, and every job created ends terminal."""
    stack = stack_factory(
        "memory", API_KEYS_FILE=keys_file(tmp_path), MAX_REQUEST_BYTES="65536", SYNC_TIMEOUT_S="30"
    )
    fuzz = Fuzz(stack)

    @settings(
        max_examples=FUZZ_REQUESTS + 50,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests in every run; CI must not flake
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )
    @given(data=st.data())
    def one_request(data: st.DataObject) -> None:
        fuzz.send(data.draw(calls()))

    try:
        one_request()
        terminal: collections.Counter[str] = collections.Counter()
        for job_id, owner in fuzz.jobs.items():
            headers = as_(owner) if owner else {}
            terminal[wait_terminal(stack, job_id, headers)] += 1
    finally:
        fuzz.client.close()
    print(
        f"\nfuzz: {fuzz.requests} requests; statuses {dict(sorted(fuzz.statuses.items()))}; "
        f"5xx {sum(n for s, n in fuzz.statuses.items() if s >= 500)}; "
        f"jobs created {len(fuzz.jobs)}, terminal {dict(terminal)}, "
        f"left pending {len(fuzz.jobs) - sum(terminal.values())}"
    )
    print("fuzz by operation:", dict(sorted(fuzz.by_operation.items())))
    assert fuzz.requests >= FUZZ_REQUESTS
    assert sum(terminal.values()) == len(fuzz.jobs)
    assert fuzz.statuses[202] > 50 and fuzz.statuses[400] > 50 and fuzz.statuses[401] > 50


# --- quiet logs -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_logs_hold_no_prompt_response_or_key(
    stack_factory: Callable[..., Stack], tmp_path: Path, mode: str
) -> None:
    """At DEBUG, by default no prompt, response or API key reaches any service's log, while
    a Vertex error message does."""
    stack = stack_factory(mode, API_KEYS_FILE=keys_file(tmp_path), LOG_LEVEL="DEBUG")
    secret = f"PROMPT-{uuid.uuid4().hex}"
    system = f"SYSTEM-{uuid.uuid4().hex}"
    body = {
        "contents": [{"role": "user", "parts": [{"text": secret}]}],
        "systemInstruction": {"parts": [{"text": system}]},
        "labels": {"marker": "label-value-zzz"},
    }
    job_id = stack.submit(body, headers=as_("alice")).json()["job_id"]
    assert wait_terminal(stack, job_id, as_("alice")) == "succeeded"
    # Malformed input must not be echoed into the log either.
    bad = stack.submit(None, content=f'{{"contents": "{secret}-bad"}}'.encode(), headers=as_("bob"))
    assert bad.status_code == 400
    stack.submit(prompt("x"), headers={"X-API-Key": "WRONG-KEY-zzz"})
    # A Vertex refusal is kept: the message says why the job failed.
    stack.configure_standin({"default": {"status": 400}})
    failed_id = stack.submit(prompt(f"{secret}-fails"), headers=as_("alice")).json()["job_id"]
    assert wait_terminal(stack, failed_id, as_("alice")) == "failed"

    processes = [*stack.ingresses, *([stack.worker] if stack.worker else [])]
    logs = "\n".join(process.log_text() for process in processes)
    for forbidden in (
        secret,
        system,
        "stand-in reply",
        "label-value-zzz",
        "WRONG-KEY-zzz",
        *KEYS.values(),
    ):
        assert forbidden not in logs, f"{forbidden!r} reached the logs"
    failure = [
        json.loads(line)
        for line in logs.splitlines()
        if line.startswith("{") and '"job failed"' in line and failed_id in line
    ]
    assert failure and "stand-in" in failure[0]["error_message"]
    assert '"job_id": "' + job_id in logs  # the logs do follow the job
