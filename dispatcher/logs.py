"""One JSON object per log line, in the shape Cloud Logging reads.

https://cloud.google.com/logging/docs/structured-logging: `severity` and
`message` are recognised; any other key lands in `jsonPayload`. Extra fields
passed with `extra={...}` (job_id, region, ...) are copied onto the line, so one
job can be followed from the ingress to the worker.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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
