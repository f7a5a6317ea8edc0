"""Checks a client's generateContent request before anything is stored.

Only the shape the dispatcher relies on is enforced; every other field is passed
to Vertex untouched, so new Vertex fields work without a release.
"""

from __future__ import annotations

import json
from typing import Any

from dispatcher.errors import InvalidRequest
from dispatcher.jobs import JsonObject

MAX_DEPTH = 64
_OBJECT_FIELDS = ("systemInstruction", "generationConfig", "toolConfig", "labels")
_LIST_FIELDS = ("safetySettings", "tools")


def parse_request(body: bytes) -> JsonObject:
    """Parse and check a GenerateContentRequest body.

    Returns:
        The request as a JSON object.

    Raises:
        InvalidRequest: naming the field that is wrong.
    """
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise InvalidRequest(f"body nests deeper than {MAX_DEPTH} levels") from None
    check_request(request)
    return dict(request)


def check_request(request: Any) -> None:
    """Check an already-parsed request; see `parse_request`."""
    if not isinstance(request, dict):
        raise InvalidRequest("body must be a JSON object (a GenerateContentRequest)")
    if _depth(request) > MAX_DEPTH:
        raise InvalidRequest(f"body nests deeper than {MAX_DEPTH} levels")
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        raise InvalidRequest("contents: required, a non-empty list", field="contents")
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        if not isinstance(content, dict):
            raise InvalidRequest(f"{where}: must be an object", field=where)
        role = content.get("role")
        if role is not None and not isinstance(role, str):
            raise InvalidRequest(f"{where}.role: must be a string", field=f"{where}.role")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise InvalidRequest(
                f"{where}.parts: required, a non-empty list", field=f"{where}.parts"
            )
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or not part:
                raise InvalidRequest(
                    f"{where}.parts[{j}]: must be a non-empty object (text, inlineData, ...)",
                    field=f"{where}.parts[{j}]",
                )
            text = part.get("text")
            if text is not None and not isinstance(text, str):
                raise InvalidRequest(
                    f"{where}.parts[{j}].text: must be a string", field=f"{where}.parts[{j}].text"
                )
    for name in _OBJECT_FIELDS:
        if name in request and not isinstance(request[name], dict):
            raise InvalidRequest(f"{name}: must be an object", field=name)
    for name in _LIST_FIELDS:
        if name in request and not isinstance(request[name], list):
            raise InvalidRequest(f"{name}: must be a list", field=name)
    cached = request.get("cachedContent")
    if cached is not None and not isinstance(cached, str):
        raise InvalidRequest("cachedContent: must be a string", field="cachedContent")


def _depth(value: Any) -> int:
    """Nesting depth, iteratively (a hostile body must not exhaust the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest
