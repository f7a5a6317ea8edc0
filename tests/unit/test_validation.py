"""Request validation: bad input is refused with a message naming the field."""

from __future__ import annotations

import json

import pytest

from dispatcher.errors import InvalidRequest
from dispatcher.validation import MAX_DEPTH, parse_request

GOOD = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_valid_request_passes_through_untouched() -> None:
    """Known and unknown fields are kept as sent."""
    body = {**GOOD, "generationConfig": {"temperature": 0.2}, "futureField": [1, 2]}
    assert parse_request(json.dumps(body).encode()) == body


@pytest.mark.parametrize(
    ("body", "words"),
    [
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
    ],
)
def test_bad_request_is_refused_with_the_field(body: bytes, words: str) -> None:
    """Each malformed body raises InvalidRequest whose message says what was wrong."""
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
