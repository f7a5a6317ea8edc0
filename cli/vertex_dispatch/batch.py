"""The files of a batch: its input, the journal of a run, and the output.

How a batch resumes: every line's ``Idempotency-Key`` is derived from the input's SHA-256
and the line number, so submitting a line again re-attaches to the job it already has. A
journal next to the output (``OUT.jsonl.progress``, append-only JSONL) records each job id as
soon as the ingress accepts it and each finished line's output record as soon as it ends; a
re-run skips finished lines (from the journal or from a previous ``OUT.jsonl``) and polls the
jobs it already has instead of submitting them again. The output is assembled in input order
from those records once every line has an outcome; then the journal is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from vertex_dispatch import PROG
from vertex_dispatch.client import TERMINAL
from vertex_dispatch.errors import BatchInputError, CliError

REJECTED: Final = "rejected"
"""A batch line the ingress refused (400, 409, 413, 422): submitting it again cannot help."""
UNSUBMITTED: Final = "unsubmitted"
"""A batch line that got no job: the ingress stayed busy or unreachable through every retry."""
FINISHED: Final = TERMINAL | {REJECTED}
"""Batch outcomes a re-run keeps; any other outcome is tried again."""
MAX_INPUT_ERRORS_SHOWN: Final = 10


# -- input ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchLine:
    """One request of a batch input.

    Attributes:
        line: Its 1-based line number in the input file (blank lines are skipped but counted).
        request: The GenerateContentRequest, sent as it is.
        request_sha256: Hash of the request's canonical JSON; tells a re-run whether a
            recorded result still belongs to this line.
    """

    line: int
    request: dict[str, Any]
    request_sha256: str


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchInput:
    """A parsed batch input file.

    Attributes:
        lines: The requests in input order.
        sha256: Hash of the file's bytes; with a line number it makes the line's
            ``Idempotency-Key``.
    """

    lines: tuple[BatchLine, ...]
    sha256: str


def canonical_sha256(document: Any) -> str:
    """SHA-256 of a JSON document written canonically (sorted keys, no spaces)."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), "a number")


def parse_input_line(text: str) -> dict[str, Any]:
    """Parse one input line into its request.

    Args:
        text: The line, without its line break.

    Returns:
        The value of ``"request"``.

    Raises:
        ValueError: The line is not ``{"request": {...}}`` with a non-empty
            ``contents`` list; the message says what is wrong, without the line number.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(document, dict):
        raise ValueError(f'expected an object {{"request": {{...}}}}, got {_json_type(document)}')
    if "request" not in document:
        keys = ", ".join(repr(key) for key in list(document)[:5]) or "none"
        raise ValueError(
            f'no "request" field (each line is {{"request": GenerateContentRequest}}; '
            f"keys found: {keys})"
        )
    request = document["request"]
    if not isinstance(request, dict):
        raise ValueError(f'"request" must be an object, got {_json_type(request)}')
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        found = "missing" if "contents" not in request else _json_type(contents)
        if contents == []:
            found = "an empty list"
        raise ValueError(f"request.contents: required, a non-empty list ({found})")
    return request


def read_batch_input(path: Path) -> BatchInput:
    """Read a batch input file: one ``{"request": GenerateContentRequest}`` per line.

    Blank lines are skipped. Every bad line is reported, each with its line number.

    Args:
        path: The JSONL file.

    Returns:
        The requests and the file's hash.

    Raises:
        BatchInputError: The file cannot be read, holds no request, or has bad lines.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchInputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    lines: list[BatchLine] = []
    problems: list[str] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            problems.append(
                f"{path}:{number}: not UTF-8 "
                f"(byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            )
            continue
        if not text.strip():
            continue
        try:
            request = parse_input_line(text)
        except ValueError as exc:
            problems.append(f"{path}:{number}: {exc}")
            continue
        lines.append(
            BatchLine(line=number, request=request, request_sha256=canonical_sha256(request))
        )
    if problems:
        shown = problems[:MAX_INPUT_ERRORS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more bad lines")
        raise BatchInputError("\n".join(shown))
    if not lines:
        raise BatchInputError(f'{path}: no requests (expected {{"request": {{...}}}} lines)')
    return BatchInput(lines=tuple(lines), sha256=hashlib.sha256(data).hexdigest())


def idempotency_key(input_sha256: str, line: int) -> str:
    """The ``Idempotency-Key`` of a batch line: the same input and line give the same key.

    Args:
        input_sha256: Hash of the whole input file.
        line: The line number.

    Returns:
        ``vd-`` and 64 hex digits (the ingress takes up to 256 characters).
    """
    return "vd-" + hashlib.sha256(f"{input_sha256}:{line}".encode()).hexdigest()


# -- outcomes and resume state -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class LineOutcome:
    """What became of a batch line: the few fields the progress bar and summary need.

    Attributes:
        line: The input line number.
        status: A job status, ``rejected``, ``unsubmitted``, or the last status seen
            of a job that could not be followed to its end.
        job_id: The job, if one was created.
        region: The region that served (or was assigned) the job.
        error_status: The error's ``status`` (``INVALID_ARGUMENT``...) when there is one.
    """

    line: int
    status: str
    job_id: str | None = None
    region: str | None = None
    error_status: str | None = None

    @property
    def finished(self) -> bool:
        """Whether a re-run keeps this outcome."""
        return self.status in FINISHED

    @property
    def succeeded(self) -> bool:
        """Whether the line got a response."""
        return self.status == "succeeded"

    @property
    def label(self) -> str:
        """The outcome as the summary groups it: ``succeeded``, ``failed INVALID_ARGUMENT``."""
        if self.succeeded or not self.error_status:
            return self.status
        return f"{self.status} {self.error_status}"

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LineOutcome:
        """Read an output record."""
        error = record.get("error")
        error_status = error.get("status") if isinstance(error, dict) else None
        return cls(
            line=int(record["line"]),
            status=str(record["status"]),
            job_id=_str_or_none(record.get("job_id")),
            region=_str_or_none(record.get("region")),
            error_status=_str_or_none(error_status),
        )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def output_record(
    line: BatchLine,
    *,
    status: str,
    job_id: str | None = None,
    region: str | None = None,
    attempts: int | None = None,
    response: Any = None,
    error: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One output line; the ``request``/``response``/``status`` names follow Vertex batch output.

    Returns:
        ``{"line", "request", "job_id", "status", "region", "attempts"}`` plus
        ``"response"`` or ``"error"``.
    """
    record: dict[str, Any] = {
        "line": line.line,
        "request": line.request,
        "job_id": job_id,
        "status": status,
        "region": region,
        "attempts": attempts,
    }
    if response is not None:
        record["response"] = response
    if error is not None:
        record["error"] = dict(error)
    return record


def record_from_view(line: BatchLine, view: Mapping[str, Any]) -> dict[str, Any]:
    """The output record of a line from its job's view."""
    attempts = view.get("attempts")
    return output_record(
        line,
        status=str(view.get("status")),
        job_id=_str_or_none(view.get("job_id")),
        region=_str_or_none(view.get("region")),
        attempts=attempts if isinstance(attempts, int) else None,
        response=view.get("result") if view.get("status") == "succeeded" else None,
        error=view.get("error") if isinstance(view.get("error"), dict) else None,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredRecord:
    """A finished line's output record, kept in a file rather than in memory.

    Attributes:
        outcome: Its summary.
        path: The file holding the record (the journal or a previous output).
        offset: Where its line starts.
    """

    outcome: LineOutcome
    path: Path
    offset: int


@dataclass(kw_only=True, slots=True)
class ResumeState:
    """What earlier runs left for this input.

    Attributes:
        finished: Lines whose result is kept, by line number.
        job_ids: Lines with a job that has not been seen finished, by line number.
        ignored: Records that belong to no line of this input (the line changed, or the
            record is unreadable).
    """

    finished: dict[int, StoredRecord] = field(default_factory=dict)
    job_ids: dict[int, str] = field(default_factory=dict)
    ignored: int = 0


def scan_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Each line of a JSONL file with its offset; None for a line that is not a JSON object.

    A missing file yields nothing. Blank lines are skipped.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        offset = 0
        for raw in handle:
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                document = json.loads(raw)
            except ValueError:  # also a torn last line after a crash
                yield start, None
                continue
            yield start, document if isinstance(document, dict) else None


def plan_resume(
    lines: Sequence[BatchLine], sources: Iterable[tuple[Path, Iterable[tuple[int, Any]]]]
) -> ResumeState:
    """Decide what a run can skip, from records of earlier runs.

    A record counts for a line when its line number is in the input and its request hash
    matches the line's current request. A finished record is kept; a later record never
    replaces a finished one. An unfinished record with a job id makes the run follow that
    job instead of submitting the line again.

    Args:
        lines: The input.
        sources: ``(path, records)`` in the order they were written (the previous output
            first, then the journal); ``records`` as ``scan_records`` yields them.

    Returns:
        The lines to skip and the jobs to re-attach to.
    """
    by_number = {line.line: line for line in lines}
    state = ResumeState()
    for path, records in sources:
        for offset, record in records:
            line = _line_of(record, by_number)
            if line is None or record is None:
                state.ignored += 1
                continue
            if line.line in state.finished:
                continue
            outcome = LineOutcome.from_record(record)
            if outcome.finished:
                state.finished[line.line] = StoredRecord(outcome=outcome, path=path, offset=offset)
                state.job_ids.pop(line.line, None)
            elif outcome.job_id is not None:
                state.job_ids[line.line] = outcome.job_id
    return state


def _line_of(record: Any, by_number: Mapping[int, BatchLine]) -> BatchLine | None:
    if not isinstance(record, dict) or not isinstance(record.get("status"), str):
        return None
    number = record.get("line")
    line = by_number.get(number) if isinstance(number, int) else None
    if line is None:
        return None
    recorded = record.get("request_sha256")
    if not isinstance(recorded, str):
        recorded = canonical_sha256(record["request"]) if "request" in record else None
    return line if recorded == line.request_sha256 else None


def load_resume_state(lines: Sequence[BatchLine], output: Path, journal: Path) -> ResumeState:
    """``plan_resume`` over the previous output and the journal, if they exist."""
    return plan_resume(lines, [(output, scan_records(output)), (journal, scan_records(journal))])


def _dumps(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class Journal:
    """The append-only JSONL journal of a batch run, locked against a second run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] = path.open("ab")
        try:
            _lock(self._file, path)
            if self._file.tell() > 0:
                # A crash may have torn the last line; never glue the next record onto it.
                with path.open("rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":
                        self._file.write(b"\n")
        except BaseException:
            self._file.close()
            raise

    def job_accepted(self, line: BatchLine, job_id: str) -> None:
        """Record that the line has a job, before following it."""
        self._append(
            {
                "line": line.line,
                "request_sha256": line.request_sha256,
                "job_id": job_id,
                "status": "pending",
            }
        )

    def line_finished(self, record: Mapping[str, Any]) -> int:
        """Record a finished line's output record; returns where it starts."""
        return self._append(record)

    def _append(self, document: Mapping[str, Any]) -> int:
        offset = self._file.tell()
        self._file.write(_dumps(document))
        # Flushed to the OS at once: a killed process loses nothing it wrote.
        self._file.flush()
        return offset

    def close(self) -> None:
        """Close (and unlock) the journal."""
        self._file.close()


def _lock(file: IO[bytes], path: Path) -> None:
    if sys.platform == "win32":  # no flock; two runs on one output are the user's care
        return
    import fcntl

    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CliError(
            f"{path}: another {PROG} batch is writing this output; wait for it or pick "
            "another --output"
        ) from None


def write_output(
    path: Path,
    lines: Sequence[BatchLine],
    finished: Mapping[int, StoredRecord],
    unfinished: Mapping[int, Mapping[str, Any]],
) -> None:
    """Write every line's record in input order, replacing ``path`` atomically.

    Args:
        path: The output file.
        lines: The input.
        finished: Finished lines' records, read back from where they are stored.
        unfinished: Output records of the other lines; every line is in one of the two.
    """
    temporary = path.with_name(path.name + ".tmp")
    with contextlib.ExitStack() as stack:
        sources: dict[Path, IO[bytes]] = {}
        out = stack.enter_context(temporary.open("wb"))
        for line in lines:
            stored = finished.get(line.line)
            if stored is None:
                out.write(_dumps(unfinished[line.line]))
                continue
            source = sources.get(stored.path)
            if source is None:
                source = sources[stored.path] = stack.enter_context(stored.path.open("rb"))
            source.seek(stored.offset)
            raw = source.readline()
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    os.replace(temporary, path)
