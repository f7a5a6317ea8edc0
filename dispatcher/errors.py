"""The dispatcher's exceptions: one root, a few specific kinds.

Google and httpx exceptions are translated where they enter (the stores, the
publisher, the Vertex client), so nothing above them sees a third-party type.
"""

from __future__ import annotations


class DispatcherError(Exception):
    """The dispatcher failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigError(DispatcherError):
    """A setting is missing or malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {problem}")


class InvalidRequest(DispatcherError):
    """The request is not a valid generateContent request."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class JobNotFound(DispatcherError):
    """No such job."""


class JobExists(DispatcherError):
    """A job with this id already exists."""


class IdempotencyConflict(DispatcherError):
    """Idempotency-Key was already used with a different request body"""


class StoreUnavailable(DispatcherError):
    """The job store could not be reached."""


class JobNotStored(StoreUnavailable):
    """the job could not be stored; nothing was queued, try again"""


class CorruptRecord(DispatcherError):
    """A stored record cannot be decoded: a permanent failure of that job, never retried."""


class PublishFailed(DispatcherError):
    """The job could not be handed to the queue."""


class Overloaded(DispatcherError):
    """Too much work is waiting; try again later."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"too many jobs in flight; retry after {retry_after_s} s")


class RegionsBusy(DispatcherError):
    """Every allowed region stayed at its limit of calls in flight until the deadline."""
