"""One table from HTTP status to `google.rpc.Code` name, for every error body we write or read.

The services' error bodies (`{"error": {"code", "status", "message"}}`), the Vertex
client's reading of Vertex errors without a status, and the Vertex stand-in all take
the name from here, so the same status never gets two names.

Canonical names only: the 17 members of `google.rpc.Code`, mapped as code.proto's
"HTTP Mapping" comments say where they say anything
(https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto). The
statuses the proto does not map carry a comment saying where their name comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

UNKNOWN: Final = "UNKNOWN"
"""The name of a status outside the table (gRPC's mapping: "all other codes")."""

STATUS_NAMES: Final[Mapping[int, str]] = MappingProxyType(
    {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        # Not in the proto. A route that does not support the method: "the operation is
        # not implemented or is not supported/enabled in this service" (UNIMPLEMENTED's
        # definition), what a gRPC server answers for a method it does not have.
        405: "UNIMPLEMENTED",
        # 409 is both ALREADY_EXISTS and ABORTED in the proto; the default is ABORTED
        # (handlers that mean ALREADY_EXISTS or FAILED_PRECONDITION name it).
        409: "ABORTED",
        # Not in the proto. A request that is wrong whatever the state of the system
        # (INVALID_ARGUMENT's definition): no length, too large a body or URI, the wrong
        # media type, too many or too large headers. Google's APIs answer an oversized
        # request with 400 INVALID_ARGUMENT too.
        411: "INVALID_ARGUMENT",
        413: "INVALID_ARGUMENT",
        414: "INVALID_ARGUMENT",
        415: "INVALID_ARGUMENT",
        429: "RESOURCE_EXHAUSTED",
        431: "INVALID_ARGUMENT",  # not in the proto: as 411 to 415
        499: "CANCELLED",
        500: "INTERNAL",
        501: "UNIMPLEMENTED",
        # Not in the proto. gRPC's HTTP-to-gRPC mapping gives UNAVAILABLE for 502, as for
        # 503 (https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md),
        # and its clients (grpc-java's httpStatusToGrpcStatus among them) follow it: a
        # gateway that could not reach its backend is transient, retried like 503
        # (`dispatcher.vertex.TRANSIENT_CODES`). Google has no BAD_GATEWAY code.
        502: "UNAVAILABLE",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
)


def status_name(http_status: int) -> str:
    """The `google.rpc.Code` name of an HTTP error status.

    Args:
        http_status: The HTTP status of an error answer.

    Returns:
        Its canonical name, `UNKNOWN` for a status outside the table.
    """
    return STATUS_NAMES.get(http_status, UNKNOWN)
