"""Checks a client's generateContent request before anything is stored.

Only the shape the dispatcher relies on is enforced; every other field is passed
to Vertex untouched, so new Vertex fields work without a release.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from dispatcher.errors import InvalidRequest
from dispatcher.jobs import JsonObject
from dispatcher.webhooks import check_webhook_url

MAX_DEPTH = 64
# Headers the ingress stores with a job (Job.session_id, Job.idempotency_key).
MAX_SESSION_ID_CHARS = 128
MAX_IDEMPOTENCY_KEY_CHARS = 256
# Firestore and most JSON readers hold integers in 64 bits; a longer digit string
# would also hit Python's int-parsing limit (4300 digits) as a bare ValueError.
_INT64 = (-(2**63), 2**63 - 1)
_MAX_INT_DIGITS = 20
_OBJECT_FIELDS = ("systemInstruction", "generationConfig", "toolConfig", "labels")
_LIST_FIELDS = ("safetySettings", "tools")
# Part fields whose value is an object in Vertex's Part message.
_PART_OBJECTS = (
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
    "videoMetadata",
)
# A \uD800-\uDFFF escape: the only way a lone surrogate gets into parsed JSON text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_request(body: bytes) -> JsonObject:
    """Parse and check a GenerateContentRequest body.

    Returns:
        The request as a JSON object.

    Raises:
        InvalidRequest: naming the field that is wrong.
    """
    try:
        text = body.decode("utf-8")
        request = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise InvalidRequest("body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise InvalidRequest(f"body nests deeper than {MAX_DEPTH} levels") from None
    check_request(request)
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(request)
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
        _check_parts(parts, f"{where}.parts")
    for name in _OBJECT_FIELDS:
        if name in request and not isinstance(request[name], dict):
            raise InvalidRequest(f"{name}: must be an object", field=name)
    for name in _LIST_FIELDS:
        if name in request and not isinstance(request[name], list):
            raise InvalidRequest(f"{name}: must be a list", field=name)
    instruction = request.get("systemInstruction")
    if isinstance(instruction, dict) and "parts" in instruction:
        parts = instruction["parts"]
        if not isinstance(parts, list) or not parts:
            raise InvalidRequest(
                "systemInstruction.parts: must be a non-empty list", field="systemInstruction.parts"
            )
        _check_parts(parts, "systemInstruction.parts")
    labels = request.get("labels")
    if isinstance(labels, dict):
        for key, value in labels.items():
            if not isinstance(value, str):
                raise InvalidRequest(
                    f"labels.{key[:64]}: must be a string", field=f"labels.{key[:64]}"
                )
    cached = request.get("cachedContent")
    if cached is not None and not isinstance(cached, str):
        raise InvalidRequest("cachedContent: must be a string", field="cachedContent")
    model = request.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model: must be a string", field="model")


def check_headers(headers: Mapping[str, str]) -> None:
    """Check the request headers the ingress stores with a job.

    The ingress's `RequestLimits` middleware calls this on every request, before any
    handler, so handlers read these headers as they are.

    Args:
        headers: The request's headers, looked up by lower-case name (Starlette's
            `Headers` is case-insensitive).

    Raises:
        InvalidRequest: naming the header that is too long, or an Idempotency-Key
            that is empty or not printable.
    """
    for name, limit in (
        ("X-Session-Id", MAX_SESSION_ID_CHARS),
        ("Idempotency-Key", MAX_IDEMPOTENCY_KEY_CHARS),
    ):
        value = headers.get(name.lower())
        if value is not None and len(value) > limit:
            raise InvalidRequest(f"{name}: longer than {limit} characters", field=name)
    key = headers.get("idempotency-key")
    if key is not None and (not key or not key.isprintable()):
        raise InvalidRequest(
            f"Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters",
            field="Idempotency-Key",
        )


def _check_parts(parts: list[Any], where: str) -> None:
    """Each part is a non-empty object whose known fields have the right types."""
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or not part:
            raise InvalidRequest(
                f"{at}: must be a non-empty object (text, inlineData, ...)", field=at
            )
        text = part.get("text")
        if text is not None and not isinstance(text, str):
            raise InvalidRequest(f"{at}.text: must be a string", field=f"{at}.text")
        for name in _PART_OBJECTS:
            if name in part and not isinstance(part[name], dict):
                raise InvalidRequest(f"{at}.{name}: must be an object", field=f"{at}.{name}")
        for name, key in (
            ("inlineData", "data"),
            ("inlineData", "mimeType"),
            ("fileData", "fileUri"),
        ):
            blob = part.get(name)
            if isinstance(blob, dict) and not isinstance(blob.get(key), str):
                raise InvalidRequest(
                    f"{at}.{name}.{key}: required, a string", field=f"{at}.{name}.{key}"
                )


def _parse_int(digits: str) -> int:
    """json's hook for integers: only those a 64-bit integer holds."""
    value = int(digits) if len(digits) <= _MAX_INT_DIGITS else None
    if value is None or not _INT64[0] <= value <= _INT64[1]:
        raise InvalidRequest(f"body holds the integer {digits[:24]}..., outside 64 bits")
    return value


def _parse_float(digits: str) -> float:
    """json's hook for decimals: finite ones only (1e999 would read as infinity)."""
    value = float(digits)
    if not math.isfinite(value):
        raise InvalidRequest(f"body holds the number {digits[:24]}, too large for a double")
    return value


def _no_constant(name: str) -> NoReturn:
    """json's hook for NaN and Infinity, which JSON does not have."""
    raise InvalidRequest(f"body holds {name}, which is not JSON")


def _check_unicode(value: Any) -> None:
    """Refuse strings (and keys) holding a lone UTF-16 surrogate: no UTF-8 encodes them."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: list[str] = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            strings = []
            stack.extend(item)
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(
                    "body holds an unpaired surrogate escape (\\uD800-\\uDFFF), "
                    "which is not Unicode text"
                ) from None


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


# A deadline further out than this is refused: no job record lives that long (JOB_TTL_S
# defaults to 7 days), and a typo of a unit should not silently mean a month.
MAX_DEADLINE_S = 7 * 24 * 3600


def parse_deadline(raw: object, now: datetime) -> datetime | None:
    """A request's `"deadline"`: an RFC 3339 time, or seconds from now.

    Raises:
        InvalidRequest: neither, in the past, or more than 7 days ahead.
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        deadline = None
    elif isinstance(raw, int | float):
        seconds = float(raw)
        deadline = now + timedelta(seconds=seconds) if math.isfinite(seconds) else None
    elif isinstance(raw, str):
        try:
            deadline = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            deadline = None
        if deadline is not None and deadline.tzinfo is None:
            deadline = None  # RFC 3339 always has an offset
    else:
        deadline = None
    if deadline is None:
        raise InvalidRequest(
            "deadline: an RFC 3339 time (2026-12-01T12:00:00Z) or a number of seconds from now",
            field="deadline",
        )
    if deadline <= now:
        raise InvalidRequest("deadline: already passed", field="deadline")
    if (deadline - now).total_seconds() > MAX_DEADLINE_S:
        raise InvalidRequest("deadline: more than 7 days ahead", field="deadline")
    return deadline.astimezone(UTC)


def parse_webhook(raw: object, *, allow_hosts: frozenset[str]) -> str | None:
    """A request's `"webhook": {"url": "https://..."}`: the URL, once it may be used.

    Raises:
        InvalidRequest: naming why (not an object, not https, a private address, ...).
    """
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"url"}:
        raise InvalidRequest('webhook: must be an object {"url": "https://..."}', field="webhook")
    try:
        return check_webhook_url(raw["url"], allow_hosts=allow_hosts)
    except ValueError as exc:
        raise InvalidRequest(f"webhook.url: {exc}", field="webhook.url") from None
