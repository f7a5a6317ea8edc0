"""Request validation: bad input is refused with a message naming the field."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from dispatcher.errors import InvalidRequest
from dispatcher.validation import (
    MAX_DEPTH,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_SESSION_ID_CHARS,
    check_headers,
    parse_request,
)
from ingress.security import (
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    MAX_PATH_BYTES,
    MAX_QUERY_BYTES,
    RequestLimits,
)

GOOD = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_valid_request_passes_through_untouched() -> None:
    """Known and unknown fields are kept as sent."""
    body = {**GOOD, "generationConfig": {"temperature": 0.2}, "futureField": [1, 2]}
    assert parse_request(json.dumps(body).encode()) == body


MALFORMED = [
    # Shapes: what is required, and of which type.
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe", "UTF-8"),
    (b"[]", "JSON object"),
    (b"{}", "contents: required"),
    (b'{"contents": []}', "contents: required"),
    (b'{"contents": "hi"}', "contents: required"),
    (b'{"contents": [1]}', "contents[0]: must be an object"),
    (b'{"contents": [{"parts": []}]}', "contents[0].parts: required"),
    (b'{"contents": [{"parts": [{}]}]}', "contents[0].parts[0]"),
    (b'{"contents": [{"parts": [{"text": 5}]}]}', "contents[0].parts[0].text"),
    (b'{"contents": [{"role": 1, "parts": [{"text": "a"}]}]}', "contents[0].role"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "generationConfig": []}', "generationConfig"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "tools": {}}', "tools"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "cachedContent": 3}', "cachedContent"),
]

HOSTILE = [
    # Python reads these as a bare ValueError (int digits limit) or as inf/nan,
    # which no JSON writer, Firestore or Vertex would take back.
    (b'{"contents": [{"parts": [{"text": "a"}]}], "x": ' + b"9" * 5000 + b"}", "64 bits"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "x": 9223372036854775808}', "64 bits"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "x": 1e400}', "double"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "x": -1e400}', "double"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "x": NaN}', "NaN"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "x": -Infinity}', "Infinity"),
    # A lone surrogate parses, then fails to encode when stored or answered.
    (b'{"contents": [{"parts": [{"text": "\\ud800"}]}]}', "surrogate"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "labels": {"\\uDC00": "v"}}', "surrogate"),
    # Part and field shapes.
    (b'{"contents": [{"parts": [{"inlineData": "x"}]}]}', "contents[0].parts[0].inlineData"),
    (b'{"contents": [{"parts": [{"inlineData": {"mimeType": "a/b"}}]}]}', "inlineData.data"),
    (b'{"contents": [{"parts": [{"fileData": {"mimeType": "a/b"}}]}]}', "fileData.fileUri"),
    (b'{"contents": [{"parts": [{"functionCall": []}]}]}', "functionCall"),
    (
        b'{"contents": [{"parts": [{"text": "a"}]}], "systemInstruction": {"parts": []}}',
        "systemInstruction.parts",
    ),
    (
        b'{"contents": [{"parts": [{"text": "a"}]}], "systemInstruction": {"parts": [5]}}',
        "systemInstruction.parts[0]",
    ),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "labels": {"team": 5}}', "labels.team"),
    (b'{"contents": [{"parts": [{"text": "a"}]}], "model": 7}', "model: must be a string"),
]


@pytest.mark.parametrize(("body", "words"), [*MALFORMED, *HOSTILE])
def test_bad_request_is_refused_with_the_reason(body: bytes, words: str) -> None:
    """Each malformed or hostile body raises InvalidRequest whose message says what was wrong."""
    with pytest.raises(InvalidRequest) as caught:
        parse_request(body)
    assert words in str(caught.value)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 5000])
def test_deep_nesting_is_refused(depth: int) -> None:
    """A body nested past the limit is refused without exhausting the stack."""
    nested = "[" * depth + "]" * depth
    body = f'{{"contents": [{{"parts": [{{"text": "a"}}]}}], "labels": {{"x": {nested}}}}}'
    with pytest.raises(InvalidRequest, match="nests deeper"):
        parse_request(body.encode())


@pytest.mark.parametrize(
    "body",
    [
        # Escaped surrogate pairs are ordinary characters (what ensure_ascii writers send).
        b'{"contents": [{"parts": [{"text": "\\ud83d\\ude00"}]}]}',
        b'{"contents": [{"parts": [{"text": "a"}]}], "x": [-9223372036854775808, 1.5e308, -0.0]}',
        b'{"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "AA=="}}]}]}',
        b'{"contents": [{"parts": [{"text": "a"}]}],'
        b' "systemInstruction": {"parts": [{"text": "b"}]}}',
    ],
)
def test_edge_values_that_round_trip_are_accepted(body: bytes) -> None:
    """Values at the limits, surrogate pairs and well-formed parts pass."""
    request = parse_request(body)
    assert json.loads(json.dumps(request, ensure_ascii=False).encode()) == request


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({"x-session-id": "s" * (MAX_SESSION_ID_CHARS + 1)}, "X-Session-Id"),
        ({"idempotency-key": "k" * (MAX_IDEMPOTENCY_KEY_CHARS + 1)}, "Idempotency-Key"),
    ],
)
def test_stored_headers_over_their_limit_are_refused(headers: dict[str, str], words: str) -> None:
    """Headers stored with a job have a length limit, named in the message."""
    with pytest.raises(InvalidRequest, match=words):
        check_headers(headers)


def test_stored_headers_at_their_limit_pass() -> None:
    """Exactly at the limit is fine: nothing is raised."""
    check_headers(
        {
            "x-session-id": "s" * MAX_SESSION_ID_CHARS,
            "idempotency-key": "k" * MAX_IDEMPOTENCY_KEY_CHARS,
        }
    )


def _limits_app() -> TestClient:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return TestClient(
        Starlette(routes=[Route("/{path:path}", ok)], middleware=[Middleware(RequestLimits)])
    )


@pytest.mark.parametrize(
    ("path", "headers", "status", "name"),
    [
        ("/x?" + "q" * (MAX_QUERY_BYTES + 1), {}, 414, "INVALID_ARGUMENT"),
        ("/" + "p" * (MAX_PATH_BYTES + 1), {}, 414, "INVALID_ARGUMENT"),
        ("/x", {"X-Big": "v" * MAX_HEADER_BYTES}, 431, "INVALID_ARGUMENT"),
        ("/x", {f"X-H{i}": "v" * 7000 for i in range(5)}, 431, "INVALID_ARGUMENT"),
        ("/x", {f"X-H{i}": "v" for i in range(MAX_HEADER_COUNT + 1)}, 431, "INVALID_ARGUMENT"),
        ("/x", {"X-Session-Id": "s" * 200}, 400, "INVALID_ARGUMENT"),
        ("/x?" + "q" * MAX_QUERY_BYTES, {"X-Big": "v" * 7000}, 200, None),
    ],
)
def test_request_limits_answer_in_the_error_shape(
    path: str, headers: dict[str, str], status: int, name: str | None
) -> None:
    """Over-long paths, query strings and headers are refused before any handler runs."""
    response = _limits_app().get(path, headers=headers)
    assert response.status_code == status
    if name is not None:
        error = response.json()["error"]
        assert (error["code"], error["status"]) == (status, name)
