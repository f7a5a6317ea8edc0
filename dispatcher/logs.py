"""One JSON object per log line, in the shape Cloud Logging reads.

https://cloud.google.com/logging/docs/structured-logging: `severity` and
`message` are recognised; any other key lands in `jsonPayload`. Extra fields
passed with `extra={...}` (job_id, region, ...) are copied onto the line, so one
job can be followed from the ingress to the worker.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

TRACE_FIELD = "logging.googleapis.com/trace"
# The trace and the job a line is about, set per request or per run.
current_trace: ContextVar[str | None] = ContextVar("current_trace", default=None)
current_job: ContextVar[str | None] = ContextVar("current_job", default=None)
_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/|$)")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON with `severity`, `message`, `time` and extra fields."""
        line: dict[str, object] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        trace = current_trace.get()
        if trace:
            line[TRACE_FIELD] = trace
        job_id = current_job.get()
        if job_id:
            line["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(level: str) -> None:
    """Send every log line to stderr as JSON (Cloud Run collects stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Access logs would carry request paths only; the services log what matters.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request URL at INFO: one line per Vertex call is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def trace_name(headers: Mapping[str, str], project: str) -> str | None:
    """The Cloud Logging trace name from `X-Cloud-Trace-Context` or W3C `traceparent`.

    https://cloud.google.com/trace/docs/trace-context: the name is
    `projects/PROJECT/traces/TRACE_ID`.
    """
    for header, pattern in (("x-cloud-trace-context", _CLOUD_TRACE), ("traceparent", _TRACEPARENT)):
        match = pattern.match(headers.get(header, "")[:256])
        if match:
            return f"projects/{project}/traces/{match.group(1).lower()}"
    return None


@contextmanager
def job_context(job_id: str, trace: str | None) -> Iterator[None]:
    """Every log line inside names the job and joins its trace."""
    job_token = current_job.set(job_id)
    trace_token = current_trace.set(trace or current_trace.get())
    try:
        yield
    finally:
        current_trace.reset(trace_token)
        current_job.reset(job_token)
