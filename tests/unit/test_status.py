"""Tests for the one table from HTTP status to google.rpc.Code name (dispatcher/status.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from dispatcher_devtools.vertex_standin import GOOGLE_STATUS, create_app, google_error
from google.rpc import code_pb2

from dispatcher.http import error_response
from dispatcher.status import STATUS_NAMES, UNKNOWN, status_name
from dispatcher.vertex import _google_error

# The 17 members of google.rpc.Code, spelled out so the test does not only trust
# the installed googleapis-common-protos.
# https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto
CANONICAL_NAMES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
    }
)

# code.proto's "HTTP Mapping" comments, read backwards: the codes each status stands for.
PROTO_HTTP_MAPPING = {
    400: {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"},
    401: {"UNAUTHENTICATED"},
    403: {"PERMISSION_DENIED"},
    404: {"NOT_FOUND"},
    409: {"ALREADY_EXISTS", "ABORTED"},
    429: {"RESOURCE_EXHAUSTED"},
    499: {"CANCELLED"},
    500: {"UNKNOWN", "INTERNAL", "DATA_LOSS"},
    501: {"UNIMPLEMENTED"},
    503: {"UNAVAILABLE"},
    504: {"DEADLINE_EXCEEDED"},
}

# Every status of the table, those the stand-in answers, and one outside both.
STATUSES = sorted({*STATUS_NAMES, *GOOGLE_STATUS, 418})


def test_spelled_names_are_the_installed_enum() -> None:
    """The spelled list is google.rpc.Code as installed: 17 names, none missing."""
    assert frozenset(code_pb2.Code.keys()) == CANONICAL_NAMES
    assert len(CANONICAL_NAMES) == 17


@pytest.mark.parametrize("name", sorted({*STATUS_NAMES.values(), UNKNOWN}))
def test_every_name_is_canonical(name: str) -> None:
    """Every name the table gives (and its fallback) is a member of google.rpc.Code."""
    assert name in CANONICAL_NAMES
    assert name != "OK"


@pytest.mark.parametrize(("status", "names"), sorted(PROTO_HTTP_MAPPING.items()))
def test_table_follows_code_proto(status: int, names: set[str]) -> None:
    """Each status code.proto maps gets one of the codes the proto maps to it."""
    assert status_name(status) in names


def test_table_holds_only_errors() -> None:
    """The table names error statuses only (4xx and 5xx)."""
    assert all(400 <= status < 600 for status in STATUS_NAMES)


def test_unmapped_status_is_unknown() -> None:
    """A status outside the table is UNKNOWN, as in gRPC's HTTP-to-gRPC mapping."""
    assert status_name(418) == UNKNOWN == "UNKNOWN"


@pytest.mark.parametrize("status", STATUSES)
def test_services_vertex_client_and_standin_agree(status: int) -> None:
    """The services, the Vertex client and the stand-in give one name for one status."""
    service = json.loads(bytes(error_response(status, "m").body))["error"]["status"]
    standin = json.loads(bytes(google_error(status, "m").body))["error"]["status"]
    # A Vertex error without a status in its body: the client names it from the table.
    vertex = _google_error(status, None, b"").status

    assert service == standin == vertex == status_name(status)


@pytest.mark.parametrize(("status", "name"), sorted(GOOGLE_STATUS.items()))
def test_standin_statuses_come_from_the_table(status: int, name: str) -> None:
    """The stand-in's configurable statuses carry the table's names."""
    assert name == STATUS_NAMES[status]


async def test_standin_wrong_method_answers_as_the_services() -> None:
    """The stand-in's own refusal of a wrong method names 405 as the services do."""
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://standin") as client:
        response = await client.get(
            "/v1/projects/p/locations/us-central1/publishers/google/models/m:generateContent"
        )

    assert response.status_code == 405
    assert response.json()["error"]["status"] == status_name(405) == "UNIMPLEMENTED"
