"""The client's exceptions: one root, ``CliError``, and what becomes of an error answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class CliError(Exception):
    """The command cannot go on."""


class BatchInputError(CliError):
    """The batch input file is not valid."""


class Unreachable(CliError):
    """The ingress could not be reached."""


class Stopped(CliError):
    """The run was asked to stop."""


class ApiError(CliError):
    """The ingress answered with an error."""

    def __init__(self, what: str, http_status: int, error: Mapping[str, Any]) -> None:
        self.http_status = http_status
        self.error = dict(error)
        super().__init__(f"{what}: {describe_error(error)}")


def describe_error(error: Mapping[str, Any]) -> str:
    """An error for people: ``400 INVALID_ARGUMENT: contents: required``."""
    head = " ".join(str(error[key]) for key in ("code", "status") if error.get(key) is not None)
    message = error.get("message")
    if head and message:
        return f"{head}: {message}"
    return head or str(message or "unknown error")
