"""vertex-dispatch: the command-line client of the ingress.

Three commands (``vertex-dispatch COMMAND --help`` for each):

- ``submit PROMPT``: one job, a spinner while it runs, then the response text.
- ``status JOB_ID``: the job's view as JSON.
- ``batch INPUT.jsonl``: one job per ``{"request": GenerateContentRequest}`` line, the input
  format of Vertex batch prediction
  (https://cloud.google.com/vertex-ai/generative-ai/docs/multimodal/batch-prediction-gemini),
  with a progress bar; results are written as JSONL in input order and a re-run resumes.

How a batch resumes: every line's ``Idempotency-Key`` is derived from the input's SHA-256
and the line number, so submitting a line again re-attaches to the job it already has. A
journal next to the output (``OUT.jsonl.progress``, append-only JSONL) records each job id as
soon as the ingress accepts it and each finished line's output record as soon as it ends; a
re-run skips finished lines (from the journal or from a previous ``OUT.jsonl``) and polls the
jobs it already has instead of submitting them again. The output is assembled in input order
from those records once every line has an outcome; then the journal is removed.

Only httpx and the standard library: the client is installed with the package but must not
need the services' stack (Google clients, Starlette) to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final, TextIO
from urllib.parse import urlsplit

import httpx

from dispatcher.errors import DispatcherError

PROG: Final = "vertex-dispatch"
DEFAULT_URL: Final = "http://127.0.0.1:8080"

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""A job (or some batch line) did not succeed."""
EXIT_USAGE: Final = 2
"""Bad arguments or input, or the ingress refused or could not be reached."""
EXIT_INTERRUPTED: Final = 130
"""Stopped by Ctrl-C (128 + SIGINT, as shells report it)."""

TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
"""Job statuses that never change again."""
REJECTED: Final = "rejected"
"""A batch line the ingress refused (400, 409, 413, 422): submitting it again cannot help."""
UNSUBMITTED: Final = "unsubmitted"
"""A batch line that got no job: the ingress stayed busy or unreachable through every retry."""
FINISHED: Final = TERMINAL | {REJECTED}
"""Batch outcomes a re-run keeps; any other outcome is tried again."""

RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})
"""Answers worth another try: backpressure (429, 503) and a front end's gateway errors."""
REJECTED_STATUS: Final = frozenset({400, 409, 413, 422})
FATAL_STATUS: Final = frozenset({401, 403, 404, 405})
"""Answers to ``POST /generate`` that no line can get past: credentials or the URL are wrong."""

MAX_SERVER_WAIT_S: Final = 60.0
"""The ingress caps ``GET /jobs/{id}?wait=`` at 60 s."""
SUBMIT_POLL_WAIT_S: Final = 2.0
"""``submit`` long-polls briefly: the ingress answers early only for a finished job, and the
spinner should show ``running`` soon after it starts."""
POLL_INITIAL_S: Final = 0.1
POLL_MAX_S: Final = 2.0
BACKOFF_INITIAL_S: Final = 0.5
BACKOFF_MAX_S: Final = 30.0
RETRY_AFTER_MAX_S: Final = 120.0
RETRY_MIN_S: Final = 0.25
DEFAULT_MAX_RETRIES: Final = 6
BUSY_PATIENCE_S: Final = 600.0
"""How long one request keeps coming back after 429s: the ingress asked for the wait, the
line has not failed, so it is not bounded by ``--max-retries``."""
DEFAULT_CONCURRENCY: Final = 16
DEFAULT_BATCH_WAIT_S: Final = 30.0
CONNECT_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 30.0
"""Read timeout beyond the long-poll wait."""
MAX_INPUT_ERRORS_SHOWN: Final = 10
TTY_REFRESH_S: Final = 0.1
PLAIN_REFRESH_S: Final = 5.0
"""Without a terminal, at most one progress line every this many seconds, when it changed..."""
PLAIN_HEARTBEAT_S: Final = 60.0
"""...or when this long has passed, so a log shows the run is alive."""
SPINNER_FRAMES: Final = "|/-\\"
BAR_WIDTH: Final = 20
CLEAR_LINE: Final = "\r\x1b[K"


class CliError(DispatcherError):
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


# -- command line ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Connection:
    """Where the ingress is and how to authenticate to it.

    Attributes:
        url: Base URL without a trailing slash.
        headers: Headers sent with every request (``Authorization`` when a key or token is set).
        max_retries: Retries of one request on 502-504 and connection errors (a 429 is
            retried for up to ``BUSY_PATIENCE_S``).
    """

    url: str
    headers: Mapping[str, str]
    max_retries: int = DEFAULT_MAX_RETRIES


@dataclass(frozen=True, kw_only=True, slots=True)
class SubmitCommand:
    """``vertex-dispatch submit``."""

    connection: Connection
    prompt: str
    model: str | None = None
    wait: bool = True
    json_output: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusCommand:
    """``vertex-dispatch status``."""

    connection: Connection
    job_id: str
    wait_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchCommand:
    """``vertex-dispatch batch``."""

    connection: Connection
    input: Path
    output: Path
    concurrency: int = DEFAULT_CONCURRENCY
    wait_s: float = DEFAULT_BATCH_WAIT_S

    @property
    def journal(self) -> Path:
        """The sidecar journal of the run: ``OUT.jsonl.progress``."""
        return self.output.with_name(self.output.name + ".progress")


Command = SubmitCommand | StatusCommand | BatchCommand


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 or more), got {text!r}")
    return value


def _server_wait(text: str) -> float:
    value = _seconds(text)
    if value > MAX_SERVER_WAIT_S:
        raise argparse.ArgumentTypeError(
            f"the ingress waits at most {MAX_SERVER_WAIT_S:.0f} s per poll, got {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vertex-dispatch``.

    Returns:
        A parser with the subcommands ``submit``, ``status`` and ``batch``.
    """
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--url", help=f"the ingress's base URL (env DISPATCHER_URL; default {DEFAULT_URL})"
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="the ingress's API key, sent as 'Authorization: Bearer KEY', or as "
        "'X-API-Key: KEY' with --id-token (env DISPATCHER_API_KEY, which keeps it out of the "
        "shell history)",
    )
    group.add_argument(
        "--id-token",
        metavar="TOKEN",
        help="a Cloud Run IAM identity token, e.g. $(gcloud auth print-identity-token), sent "
        "as 'Authorization: Bearer TOKEN' (env DISPATCHER_ID_TOKEN)",
    )
    group.add_argument(
        "--max-retries",
        type=_non_negative_int,
        metavar="N",
        default=DEFAULT_MAX_RETRIES,
        help="retries of one request on 502-504 and connection errors, with backoff "
        "(default %(default)s); a 429 is retried after its Retry-After for up to 10 minutes",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Command-line client of vertex-dispatcher's ingress.",
        epilog="Exit codes: 0 success, 1 a job or batch line did not succeed, 2 usage, input "
        "or HTTP error, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser(
        "submit",
        parents=[connection],
        help="submit one prompt and wait for the answer",
        description="Submit one prompt as a job, wait for it with a spinner and print the "
        "response text.",
    )
    submit.add_argument("prompt", metavar="PROMPT", help="the user text; '-' reads stdin")
    submit.add_argument("--model", help="a model configured on the ingress (default: its own)")
    submit.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the job to finish (default); --no-wait prints the job id at once",
    )
    submit.add_argument(
        "--json", dest="json_output", action="store_true", help="print the job's JSON view"
    )

    status = commands.add_parser(
        "status",
        parents=[connection],
        help="print a job's view as JSON",
        description="Print a job's view as JSON.",
    )
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument(
        "--wait",
        dest="wait_s",
        type=_seconds,
        metavar="S",
        help="wait up to S seconds for the job to finish first",
    )

    batch = commands.add_parser(
        "batch",
        parents=[connection],
        help="run every request of a JSONL file, resumably",
        description='Submit one job per input line {"request": GenerateContentRequest} (the '
        "input format of Vertex batch prediction) and write one output line per input line, "
        "in input order. Ctrl-C stops; running the same command again resumes without "
        "submitting any line twice.",
    )
    batch.add_argument("input", metavar="INPUT.jsonl", type=Path)
    batch.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="OUT.jsonl",
        help="where results go (default: INPUT.results.jsonl next to the input)",
    )
    batch.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="lines in flight at once (default %(default)s)",
    )
    batch.add_argument(
        "--wait-s",
        type=_server_wait,
        default=DEFAULT_BATCH_WAIT_S,
        metavar="S",
        help="long-poll time of each status request, at most 60 (default %(default).0f)",
    )
    return parser


def parse_command(argv: Sequence[str], env: Mapping[str, str]) -> Command:
    """Parse the command line; options win over the environment.

    Args:
        argv: The arguments after the program name.
        env: The environment (``DISPATCHER_URL``, ``DISPATCHER_API_KEY``,
            ``DISPATCHER_ID_TOKEN``).

    Returns:
        The command to run.

    Raises:
        SystemExit: The arguments are not valid (argparse prints why, exit code 2).
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        connection = Connection(
            url=base_url(args.url or env.get("DISPATCHER_URL") or DEFAULT_URL),
            headers=auth_headers(
                api_key=args.api_key or env.get("DISPATCHER_API_KEY") or None,
                id_token=args.id_token or env.get("DISPATCHER_ID_TOKEN") or None,
            ),
            max_retries=args.max_retries,
        )
    except CliError as exc:
        parser.error(str(exc))
    if args.command == "submit":
        return SubmitCommand(
            connection=connection,
            prompt=args.prompt,
            model=args.model,
            wait=args.wait,
            json_output=args.json_output,
        )
    if args.command == "status":
        return StatusCommand(connection=connection, job_id=args.job_id, wait_s=args.wait_s)
    output: Path = args.output or default_output(args.input)
    if output.resolve() == args.input.resolve():
        parser.error("--output: must not be the input file")
    return BatchCommand(
        connection=connection,
        input=args.input,
        output=output,
        concurrency=args.concurrency,
        wait_s=args.wait_s,
    )


def base_url(text: str) -> str:
    """Check a base URL and drop its trailing slashes.

    Raises:
        CliError: It is not an http:// or https:// URL.
    """
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise CliError(
            f"--url / DISPATCHER_URL: expected http(s)://HOST[:PORT][/PATH], got {text!r}"
        )
    return url


def auth_headers(*, api_key: str | None, id_token: str | None) -> dict[str, str]:
    """The headers that carry an API key and/or a Cloud Run IAM identity token.

    A key alone goes in ``Authorization: Bearer``. With a token, the token needs
    ``Authorization`` (Cloud Run's IAM check reads it), so the key goes in ``X-API-Key``,
    which the ingress reads first (``ingress/security.py``).
    """
    headers: dict[str, str] = {}
    if id_token:
        headers["Authorization"] = f"Bearer {id_token}"
        if api_key:
            headers["X-API-Key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def default_output(input_path: Path) -> Path:
    """``prompts.jsonl`` → ``prompts.results.jsonl``, next to the input."""
    stem = input_path.name.removesuffix(".jsonl")
    return input_path.with_name(f"{stem}.results.jsonl")


# -- batch input ---------------------------------------------------------------------------


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


# -- presentation --------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``75.2`` → ``1:15``; ``3725`` → ``1:02:05``; None → ``?``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgressSnapshot:
    """What the progress bar shows.

    Attributes:
        done: Lines with an outcome (earlier runs included).
        total: Lines in the input.
        succeeded: Lines that got a response.
        failed: Lines with any other outcome.
        rate_per_s: Lines finished per second in this run; None before the first.
        retries: Requests retried in this run (429, 503, connection errors).
    """

    done: int
    total: int
    succeeded: int
    failed: int
    rate_per_s: float | None
    retries: int = 0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate."""
        if not self.rate_per_s:
            return None
        return (self.total - self.done) / self.rate_per_s


def format_progress(snapshot: ProgressSnapshot, *, tty: bool) -> str:
    """One progress line: a bar for a terminal, plain words for logs.

    Returns:
        The text, without ``\\r`` or a line break.
    """
    total = max(snapshot.total, 1)
    percent = 100 * snapshot.done // total
    rate = f"{snapshot.rate_per_s:.1f}/s" if snapshot.rate_per_s is not None else "-/s"
    eta = format_duration(snapshot.eta_s if snapshot.done < snapshot.total else 0.0)
    retries = f"{snapshot.retries} retries" if snapshot.retries else ""
    if tty:
        filled = BAR_WIDTH * snapshot.done // total
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (
            f"[{bar}] {snapshot.done}/{snapshot.total} {percent:3d}% | "
            f"{snapshot.succeeded} ok, {snapshot.failed} failed | {rate} | ETA {eta}"
            + (f" | {retries}" if retries else "")
        )
    return (
        f"progress: {snapshot.done}/{snapshot.total} ({percent}%), {snapshot.succeeded} "
        f"succeeded, {snapshot.failed} failed, {rate}, ETA {eta}"
        + (f", {retries}" if retries else "")
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, header)), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCounts:
    """Where this run's lines came from.

    Attributes:
        submitted: Jobs the ingress created for this run.
        reattached: Jobs of an earlier run found again: by their journalled id, or by a
            replayed ``Idempotency-Key``.
        earlier: Lines an earlier run had finished, not run again.
    """

    submitted: int = 0
    reattached: int = 0
    earlier: int = 0


def format_summary(outcomes: Sequence[LineOutcome], *, elapsed_s: float, counts: RunCounts) -> str:
    """The end-of-batch summary: per region, per outcome, totals and time.

    Args:
        outcomes: One per input line.
        elapsed_s: Duration of this run.
        counts: Where this run's lines came from.

    Returns:
        Several lines of text.
    """
    by_region: dict[str, Counter[str]] = {}
    for outcome in outcomes:
        region = outcome.region or "(no job)"
        region_counts = by_region.setdefault(region, Counter())
        region_counts["jobs"] += 1
        region_counts["succeeded" if outcome.succeeded else "failed"] += 1
    regions = sorted(by_region.items(), key=lambda item: (-item[1]["jobs"], item[0]))
    succeeded = sum(outcome.succeeded for outcome in outcomes)
    region_rows: list[list[object]] = [
        [region, c["jobs"], c["succeeded"], c["failed"]] for region, c in regions
    ]
    region_rows.append(["total", len(outcomes), succeeded, len(outcomes) - succeeded])
    labels = Counter(outcome.label for outcome in outcomes)
    outcome_rows: list[list[object]] = [
        [label, count] for label, count in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    head = (
        f"{len(outcomes)} lines in {format_duration(elapsed_s)} ({elapsed_s:.1f} s): "
        f"{succeeded} succeeded, {len(outcomes) - succeeded} did not\n"
        f"this run: {counts.submitted} jobs submitted, {counts.reattached} re-attached, "
        f"{counts.earlier} lines already done"
    )
    return "\n\n".join(
        [
            head,
            format_table(["region", "jobs", "succeeded", "failed"], region_rows),
            format_table(["outcome", "lines"], outcome_rows),
        ]
    )


def describe_error(error: Mapping[str, Any]) -> str:
    """An error for people: ``400 INVALID_ARGUMENT: contents: required``."""
    head = " ".join(str(error[key]) for key in ("code", "status") if error.get(key) is not None)
    message = error.get("message")
    if head and message:
        return f"{head}: {message}"
    return head or str(message or "unknown error")


def response_text(result: Any) -> str | None:
    """The text of the first candidate of a GenerateContentResponse; None when it has none."""
    try:
        parts = result["candidates"][0]["content"]["parts"]
    except (KeyError, IndexError, TypeError):
        return None
    texts = [part["text"] for part in parts if isinstance(part, dict) and "text" in part]
    return "".join(texts) if texts else None


class ProgressBar:
    """Progress of a batch on stderr: a ``\\r``-redrawn bar on a terminal, lines otherwise."""

    def __init__(
        self,
        *,
        stream: TextIO,
        total: int,
        earlier: Iterable[LineOutcome],
        tty: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.total = total
        self.tty = tty
        self.clock = clock
        earlier = list(earlier)
        self.done = len(earlier)
        self.succeeded = sum(outcome.succeeded for outcome in earlier)
        self.finished_this_run = 0
        self.retries = 0
        self.started = clock()
        self._last_render = -float("inf")
        self._last_counts = (-1, -1)
        self._drawn = False

    def snapshot(self) -> ProgressSnapshot:
        """The current numbers."""
        elapsed = self.clock() - self.started
        rate = self.finished_this_run / elapsed if self.finished_this_run and elapsed > 0 else None
        return ProgressSnapshot(
            done=self.done,
            total=self.total,
            succeeded=self.succeeded,
            failed=self.done - self.succeeded,
            rate_per_s=rate,
            retries=self.retries,
        )

    def advance(self, outcome: LineOutcome) -> None:
        """Count a line that got its outcome."""
        self.done += 1
        self.finished_this_run += 1
        self.succeeded += outcome.succeeded
        self.render()

    def retried(self) -> None:
        """Count a retried request."""
        self.retries += 1

    def render(self, *, force: bool = False) -> None:
        """Draw the bar (or print a line) unless it was done a moment ago."""
        now = self.clock()
        since = now - self._last_render
        if not force:
            changed = (self.done, self.retries) != self._last_counts
            if self.tty:
                due = since >= TTY_REFRESH_S
            else:
                due = (changed and since >= PLAIN_REFRESH_S) or since >= PLAIN_HEARTBEAT_S
            if not due:
                return
        self._last_render = now
        self._last_counts = (self.done, self.retries)
        text = format_progress(self.snapshot(), tty=self.tty)
        if self.tty:
            # A line longer than the terminal wraps, and \r then redraws only its tail.
            columns = shutil.get_terminal_size().columns
            self.stream.write(CLEAR_LINE + text[: max(columns - 1, 20)])
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        """Print a message line without breaking the bar."""
        if self.tty and self._drawn:
            self.stream.write(CLEAR_LINE)
            self._drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state (unless a log line already shows it) and end the bar's line."""
        self.render(force=self.tty or (self.done, self.retries) != self._last_counts)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class Spinner:
    """A job's status while ``submit`` waits: a spinner on a terminal, else a line per change."""

    def __init__(self, *, stream: TextIO, tty: bool, job_id: str) -> None:
        self.stream = stream
        self.tty = tty
        self.job_id = job_id
        self.status = "pending"
        self.started = time.monotonic()
        self._frame = 0

    def update(self, status: str) -> None:
        """Show a new status."""
        if status == self.status:
            return
        self.status = status
        if not self.tty:
            self.stream.write(f"job {self.job_id}: {status}\n")
            self.stream.flush()

    async def spin(self) -> None:
        """Redraw every tenth of a second until cancelled (terminal only)."""
        if not self.tty:
            self.stream.write(f"job {self.job_id}: {self.status}\n")
            self.stream.flush()
            return
        while True:
            elapsed = time.monotonic() - self.started
            frame = SPINNER_FRAMES[self._frame % len(SPINNER_FRAMES)]
            self._frame += 1
            self.stream.write(
                f"{CLEAR_LINE}{frame} job {self.job_id}: {self.status} {elapsed:.1f}s"
            )
            self.stream.flush()
            await asyncio.sleep(TTY_REFRESH_S)

    def clear(self) -> None:
        """Remove the spinner line."""
        if self.tty:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()


# -- HTTP ----------------------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3).

    Returns:
        The delay (0 or more), or None when the header is missing or unreadable.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def retry_delay(attempt: int, retry_after: float | None, *, jitter: float) -> float:
    """How long to wait before retry number ``attempt + 1``.

    Args:
        attempt: Retries made so far (0 for the first retry).
        retry_after: The server's ``Retry-After`` in seconds, honoured when given (at least
            ``RETRY_MIN_S``, so ``Retry-After: 0`` cannot make a tight loop; at most 120 s).
        jitter: A factor in [0, 1) spreading clients apart; the backoff is scaled into
            [50 %, 100 %) of itself.

    Returns:
        Seconds to sleep.
    """
    if retry_after is not None:
        return min(max(retry_after, RETRY_MIN_S), RETRY_AFTER_MAX_S)
    backoff = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0**attempt)
    return backoff * (0.5 + jitter / 2)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The ``{"code", "status", "message"}`` of an error answer, even one not from the ingress."""
    with contextlib.suppress(ValueError):
        error = response.json().get("error")
        if isinstance(error, dict):
            return error
    return {
        "code": response.status_code,
        "status": response.reason_phrase.upper().replace(" ", "_") or None,
        "message": response.text[:200].strip() or None,
    }


def unreachable_error(exc: Unreachable) -> dict[str, Any]:
    """The ``error`` of a line whose request never got an answer."""
    return {"code": None, "status": "UNAVAILABLE", "message": str(exc)}


def accepted_job_id(response: httpx.Response) -> str | None:
    """The ``job_id`` of a 202 answer; None when the body has none."""
    try:
        document = response.json()
    except ValueError:
        return None
    job_id = document.get("job_id") if isinstance(document, dict) else None
    return job_id if isinstance(job_id, str) and job_id else None


def _describe_transport(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _user_agent() -> str:
    try:
        version = metadata.version("vertex-dispatcher")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"{PROG}/{version}"


def open_http_client(
    connection: Connection, *, concurrency: int, wait_s: float
) -> httpx.AsyncClient:
    """The one HTTP client of a command, with timeouts that fit a long poll."""
    return httpx.AsyncClient(
        headers={"User-Agent": _user_agent(), **connection.headers},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=httpx.Timeout(
            REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, read=wait_s + REQUEST_TIMEOUT_S
        ),
    )


class IngressClient:
    """The ingress's two endpoints, with bounded retries on 429, 502-504 and connection errors.

    A request that gets a 429 waits its ``Retry-After`` and tries again, for up to
    ``BUSY_PATIENCE_S``; the other requests go on meanwhile. (Holding back every submission
    after one 429 was measured 3x slower against an ingress at ``MAX_PENDING_JOBS``: slots
    freed by finished jobs stayed idle.)
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        connection: Connection,
        *,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.http = http
        self.url = connection.url
        self.max_retries = connection.max_retries
        self.on_retry = on_retry

    async def submit(
        self,
        request: Mapping[str, Any],
        *,
        key: str,
        stop: asyncio.Event | None = None,
    ) -> httpx.Response:
        """``POST /generate`` with an ``Idempotency-Key``, so a retry finds the same job.

        Raises:
            Unreachable: Connection errors through every retry.
            Stopped: ``stop`` was set while waiting to retry.
        """
        return await self._send(
            "POST",
            "/generate",
            json=request,
            headers={"Idempotency-Key": key},
            stop=stop,
        )

    async def job(self, job_id: str, *, wait_s: float | None) -> dict[str, Any]:
        """``GET /jobs/{job_id}[?wait=S]``.

        Returns:
            The job's view.

        Raises:
            ApiError: Any answer but 200 (after retries).
            Unreachable: Connection errors through every retry.
        """
        params = {"wait": f"{wait_s:g}"} if wait_s else None
        what = f"GET /jobs/{job_id}"
        response = await self._send("GET", f"/jobs/{job_id}", params=params)
        if response.status_code != 200:
            raise ApiError(what, response.status_code, error_of(response))
        try:
            view = response.json()
        except ValueError:
            view = None
        if not isinstance(view, dict) or not isinstance(view.get("status"), str):
            raise ApiError(what, 200, {"message": f"not a job view: {response.text[:200]!r}"})
        return view

    async def _send(
        self,
        method: str,
        path: str,
        *,
        stop: asyncio.Event | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        failures = 0  # 502-504 and connection errors: at most max_retries
        busy = 0  # 429s: retried while the ingress's Retry-After delays fit the patience
        busy_waited = 0.0
        while True:
            try:
                response = await self.http.request(method, self.url + path, **kwargs)
            except httpx.TransportError as exc:
                problem = _describe_transport(exc)
                if failures >= self.max_retries:
                    raise Unreachable(
                        f"{method} {self.url}{path}: {problem} (after {failures + 1} tries)"
                    ) from exc
                delay = retry_delay(failures, None, jitter=random.random())  # noqa: S311 - jitter, not secrecy
                failures += 1
                retry = f"retry {failures} of {self.max_retries}"
            else:
                code = response.status_code
                if code not in RETRYABLE_STATUS:
                    return response
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                problem = describe_error(error_of(response))
                if code == 429:
                    delay = retry_delay(busy, retry_after, jitter=random.random())  # noqa: S311
                    if busy_waited + delay > BUSY_PATIENCE_S:
                        return response
                    busy, busy_waited = busy + 1, busy_waited + delay
                    retry = f"busy for {format_duration(busy_waited)} so far"
                else:
                    if failures >= self.max_retries:
                        return response
                    delay = retry_delay(failures, retry_after, jitter=random.random())  # noqa: S311
                    failures += 1
                    retry = f"retry {failures} of {self.max_retries}"
            if self.on_retry is not None:
                self.on_retry(f"{method} {path}: {problem}; {retry}, next in {delay:.1f} s")
            await _sleep_unless(delay, stop)


async def _sleep_unless(seconds: float, stop: asyncio.Event | None) -> None:
    """Sleep, or raise ``Stopped`` as soon as ``stop`` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    if stop.is_set():
        raise Stopped
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    if stop.is_set():
        raise Stopped


async def wait_for_job(
    client: IngressClient,
    job_id: str,
    *,
    wait_s: float,
    timeout_s: float | None = None,
    on_view: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Follow a job until it is finished (or ``timeout_s`` has passed).

    Each request long-polls for ``wait_s``; when the ingress answers early with a job that
    is not finished (an ingress that ignores ``?wait``), the next poll waits a little,
    growing from 0.1 s to 2 s, so this is never a busy loop.

    Returns:
        The last view.

    Raises:
        ApiError: The ingress answered with an error.
        Unreachable: It could not be reached.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pause = POLL_INITIAL_S
    while True:
        ask = min(wait_s, MAX_SERVER_WAIT_S)
        if deadline is not None:
            ask = max(0.0, min(ask, deadline - time.monotonic()))
        asked_at = time.monotonic()
        view = await client.job(job_id, wait_s=ask)
        if on_view is not None:
            on_view(view)
        if view["status"] in TERMINAL:
            return view
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return view
        if ask <= 0 or now - asked_at < ask / 2:  # answered early: this ingress ignores ?wait
            await asyncio.sleep(pause if deadline is None else min(pause, deadline - now))
            pause = min(pause * 1.5, POLL_MAX_S)


# -- submit and status ---------------------------------------------------------------------


async def run_submit(command: SubmitCommand, *, stdout: TextIO, stderr: TextIO) -> int:
    """Submit one prompt, wait for it with a spinner, print the answer.

    Returns:
        0 when the job succeeded (or was only submitted), 1 when it did not, 2 on HTTP errors.
    """
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": command.prompt}]}]}
    if command.model:
        request["model"] = command.model

    def note_retry(message: str) -> None:
        stderr.write(f"{PROG}: {message}\n")

    async with open_http_client(
        command.connection, concurrency=2, wait_s=MAX_SERVER_WAIT_S
    ) as http:
        client = IngressClient(http, command.connection, on_retry=note_retry)
        # A fresh key per invocation: a retried POST cannot create a second job.
        response = await client.submit(request, key=f"vd-submit-{uuid.uuid4().hex}")
        if response.status_code not in (200, 202):
            raise ApiError("POST /generate", response.status_code, error_of(response))
        job_id = accepted_job_id(response)
        if job_id is None:
            message = f"no job id in {response.text[:200]!r}"
            raise ApiError("POST /generate", response.status_code, {"message": message})
        if not command.wait:
            stdout.write((response.text.strip() if command.json_output else job_id) + "\n")
            return EXIT_OK
        spinner = Spinner(stream=stderr, tty=stderr.isatty(), job_id=job_id)
        spinning = asyncio.create_task(spinner.spin())
        try:
            view = await wait_for_job(
                client,
                job_id,
                wait_s=SUBMIT_POLL_WAIT_S,
                on_view=lambda view: spinner.update(str(view["status"])),
            )
        except asyncio.CancelledError:
            spinner.clear()
            stderr.write(
                f"{PROG}: stopped waiting; job {job_id} goes on: {PROG} status {job_id} --wait 60\n"
            )
            raise
        finally:
            spinning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await spinning
        spinner.clear()
    succeeded = view["status"] == "succeeded"
    if command.json_output:
        stdout.write(json.dumps(view, indent=2, ensure_ascii=False) + "\n")
    elif succeeded:
        text = response_text(view.get("result"))
        if text is None:
            stderr.write(f"{PROG}: the response has no text; its JSON follows\n")
            text = json.dumps(view.get("result"), indent=2, ensure_ascii=False)
        stdout.write(text.rstrip("\n") + "\n")
    if not succeeded:
        error = view.get("error") or {}
        stderr.write(f"{PROG}: job {job_id} {view['status']}: {describe_error(error)}\n")
        return EXIT_FAILED
    return EXIT_OK


async def run_status(command: StatusCommand, *, stdout: TextIO) -> int:
    """Print a job's view as JSON, after waiting for it to finish if asked.

    Returns:
        0 (errors raise).
    """
    wait_s = command.wait_s or 0.0
    async with open_http_client(
        command.connection, concurrency=2, wait_s=min(wait_s, MAX_SERVER_WAIT_S)
    ) as http:
        client = IngressClient(http, command.connection)
        if wait_s > 0:
            view = await wait_for_job(client, command.job_id, wait_s=wait_s, timeout_s=wait_s)
        else:
            view = await client.job(command.job_id, wait_s=None)
    stdout.write(json.dumps(view, indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


# -- batch ---------------------------------------------------------------------------------


class BatchRun:
    """Runs the unfinished lines of a batch with ``concurrency`` lines in flight.

    Ctrl-C once: no more submissions; requests already sent finish and their job ids are
    journalled, jobs being followed are left to run on the ingress. Twice: stop at once.
    """

    def __init__(
        self,
        *,
        batch: BatchInput,
        resume: ResumeState,
        journal: Journal,
        progress: ProgressBar,
        concurrency: int,
        wait_s: float,
    ) -> None:
        self.batch = batch
        self.journal = journal
        self.progress = progress
        self.concurrency = concurrency
        self.wait_s = wait_s
        self.finished: dict[int, StoredRecord] = dict(resume.finished)
        self.job_ids: dict[int, str] = dict(resume.job_ids)
        self.outcomes: dict[int, LineOutcome] = {n: s.outcome for n, s in resume.finished.items()}
        self.unfinished: dict[int, dict[str, Any]] = {}
        self.stop = asyncio.Event()
        self.interrupts = 0
        self.fatal: CliError | None = None
        self.counts = RunCounts(reattached=len(resume.job_ids), earlier=len(resume.finished))
        self._following: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[Any] | None = None
        self._client: IngressClient | None = None

    @property
    def client(self) -> IngressClient:
        """The ingress client of the running run."""
        assert self._client is not None, "only while run() runs"
        return self._client

    @property
    def complete(self) -> bool:
        """Whether every line has an outcome."""
        return len(self.outcomes) == len(self.batch.lines)

    async def run(self, client: IngressClient) -> None:
        """Run until every line has an outcome or the run is stopped.

        Args:
            client: The ingress client (its HTTP client belongs to the running loop).
        """
        self._client = client
        todo_lines = [line for line in self.batch.lines if line.line not in self.finished]
        todo = iter(todo_lines)
        self._main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loop
            loop.add_signal_handler(signal.SIGINT, self.interrupt)
        ticker = asyncio.create_task(self._tick())
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.concurrency, len(todo_lines))):
                    group.create_task(self._worker(todo))
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)

    def interrupt(self) -> None:
        """Ctrl-C: the first stops submitting, the second stops everything."""
        self.interrupts += 1
        if self.interrupts == 1:
            self.progress.note(
                f"{PROG}: stopping: no new submissions; saving progress (Ctrl-C again to quit now)"
            )
            self._halt()
        elif self._main is not None:
            self._main.cancel()

    def _halt(self) -> None:
        self.stop.set()
        for task in self._following:
            task.cancel()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TTY_REFRESH_S if self.progress.tty else PLAIN_REFRESH_S)
            self.progress.render()

    async def _worker(self, todo: Iterator[BatchLine]) -> None:
        # One iterator shared by every worker: lines start in input order.
        for line in todo:
            if self.stop.is_set():
                return
            await self._run_line(line)

    async def _run_line(self, line: BatchLine) -> None:
        job_id = self.job_ids.get(line.line)
        from_earlier_run = job_id is not None
        while True:
            if job_id is None:
                submitted = await self._submit(line)
                if not isinstance(submitted, str):
                    if submitted is not None:
                        self._record(line, submitted)
                    return
                job_id = submitted
            if self.stop.is_set():
                return
            following = asyncio.create_task(self._follow(line, job_id))
            self._following.add(following)
            try:
                record = await following
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if following.cancelled() and current is not None and not current.cancelling():
                    return  # stopped by Ctrl-C or a fatal error; the job id is journalled
                raise
            finally:
                self._following.discard(following)
            if record is None and from_earlier_run:
                # The job is gone (an ingress in memory mode restarted, or the record
                # expired): submit again; the same key finds the job if it still exists.
                job_id, from_earlier_run = None, False
                continue
            if record is None:
                error = {"code": 404, "status": "NOT_FOUND", "message": f"job {job_id} vanished"}
                record = output_record(line, status="lost", job_id=job_id, error=error)
            self._record(line, record)
            return

    async def _submit(self, line: BatchLine) -> str | dict[str, Any] | None:
        """A job id, or the output record of a line that ends here, or None when stopping."""
        key = idempotency_key(self.batch.sha256, line.line)
        try:
            response = await self.client.submit(line.request, key=key, stop=self.stop)
        except Stopped:
            return None
        except Unreachable as exc:
            return output_record(line, status=UNSUBMITTED, error=unreachable_error(exc))
        code = response.status_code
        if code in (200, 202):
            job_id = accepted_job_id(response)
            if job_id is None:
                message = f"no job id in {response.text[:200]!r}"
                return output_record(
                    line, status=UNSUBMITTED, error={"code": code, "message": message}
                )
            # A replayed key means an earlier run had submitted this line already.
            replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
            self.counts = dataclasses.replace(
                self.counts,
                submitted=self.counts.submitted + (not replayed),
                reattached=self.counts.reattached + replayed,
            )
            self.job_ids[line.line] = job_id
            self.journal.job_accepted(line, job_id)
            return job_id
        error = error_of(response)
        if code in FATAL_STATUS:
            self._abort(ApiError(f"POST {self.client.url}/generate", code, error))
            return None
        status = REJECTED if code in REJECTED_STATUS else UNSUBMITTED
        return output_record(line, status=status, error=error)

    async def _follow(self, line: BatchLine, job_id: str) -> dict[str, Any] | None:
        """The output record once the job ends; None when the ingress has no such job."""
        last: dict[str, Any] = {"job_id": job_id, "status": "pending"}

        def remember(view: dict[str, Any]) -> None:
            last.update(view)

        try:
            view = await wait_for_job(self.client, job_id, wait_s=self.wait_s, on_view=remember)
        except ApiError as exc:
            if exc.http_status == 404:
                return None
            if exc.http_status in FATAL_STATUS:
                self._abort(exc)
            return {**record_from_view(line, last), "error": exc.error}
        except Unreachable as exc:
            return {**record_from_view(line, last), "error": unreachable_error(exc)}
        return record_from_view(line, view)

    def _record(self, line: BatchLine, record: dict[str, Any]) -> None:
        outcome = LineOutcome.from_record(record)
        if outcome.finished:
            offset = self.journal.line_finished(record)
            self.finished[line.line] = StoredRecord(
                outcome=outcome, path=self.journal.path, offset=offset
            )
        else:
            self.unfinished[line.line] = record
        self.outcomes[line.line] = outcome
        self.progress.advance(outcome)

    def _abort(self, error: CliError) -> None:
        if self.fatal is None:
            self.fatal = error
        self._halt()


def run_batch(command: BatchCommand, *, argv: Sequence[str], stdout: TextIO, stderr: TextIO) -> int:
    """Run a batch file to the end, or until Ctrl-C, and report.

    Returns:
        0 when every line succeeded, 1 when some did not, 2 on a fatal HTTP error,
        130 when interrupted.
    """
    batch = read_batch_input(command.input)
    journal = Journal(command.journal)
    started = time.monotonic()
    try:
        resume = load_resume_state(batch.lines, command.output, command.journal)
        progress = ProgressBar(
            stream=stderr,
            total=len(batch.lines),
            earlier=[stored.outcome for stored in resume.finished.values()],
            tty=stderr.isatty(),
        )
        if resume.finished or resume.job_ids:
            progress.note(
                f"{PROG}: resuming: {len(resume.finished)} of {len(batch.lines)} lines already "
                f"done, {len(resume.job_ids)} jobs to follow up"
            )
        if resume.ignored:
            progress.note(
                f"{PROG}: ignored {resume.ignored} earlier records that match no line of "
                f"{command.input} as it is now"
            )
        run = BatchRun(
            batch=batch,
            resume=resume,
            journal=journal,
            progress=progress,
            concurrency=command.concurrency,
            wait_s=command.wait_s,
        )
        progress.render(force=True)
        # KeyboardInterrupt: a second Ctrl-C; everything done so far is journalled.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_batch(run, command, progress))
        progress.close()
    finally:
        journal.close()
    resume_hint = shlex.join([PROG, *argv])
    if run.fatal is not None:
        stderr.write(
            f"{PROG}: {run.fatal}\n{PROG}: progress saved; fix it and run: {resume_hint}\n"
        )
        return EXIT_USAGE
    if run.interrupts or not run.complete:
        stderr.write(
            f"{PROG}: interrupted: {len(run.finished)} of {len(batch.lines)} lines done, "
            f"progress saved in {command.journal}\n{PROG}: to resume, run: {resume_hint}\n"
        )
        return EXIT_INTERRUPTED
    write_output(command.output, batch.lines, run.finished, run.unfinished)
    if not run.unfinished:
        command.journal.unlink(missing_ok=True)
    outcomes = [run.outcomes[line.line] for line in batch.lines]
    stdout.write(
        format_summary(
            outcomes,
            elapsed_s=time.monotonic() - started,
            counts=run.counts,
        )
        + f"\n\nresults: {command.output}\n"
    )
    stdout.flush()
    if run.unfinished:
        stderr.write(
            f'{PROG}: {len(run.unfinished)} lines have no final result (see their "error"); '
            f"run again to retry them: {resume_hint}\n"
        )
    return EXIT_OK if all(outcome.succeeded for outcome in outcomes) else EXIT_FAILED


async def _run_batch(run: BatchRun, command: BatchCommand, progress: ProgressBar) -> None:
    async with open_http_client(
        command.connection, concurrency=command.concurrency, wait_s=command.wait_s
    ) as http:
        client = IngressClient(http, command.connection, on_retry=lambda _: progress.retried())
        try:
            await run.run(client)
        except asyncio.CancelledError:
            if not run.interrupts:
                raise
            # Cancelled by our own second Ctrl-C: end normally, the caller reports it.
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()


# -- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vertex-dispatch`` console script.

    Args:
        argv: Arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit code.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = parse_command(arguments, os.environ)
    try:
        if isinstance(command, BatchCommand):
            return run_batch(command, argv=arguments, stdout=sys.stdout, stderr=sys.stderr)
        if isinstance(command, SubmitCommand):
            if command.prompt == "-":
                command = SubmitCommand(
                    connection=command.connection,
                    prompt=sys.stdin.read(),
                    model=command.model,
                    wait=command.wait,
                    json_output=command.json_output,
                )
            return asyncio.run(run_submit(command, stdout=sys.stdout, stderr=sys.stderr))
        return asyncio.run(run_status(command, stdout=sys.stdout))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except CliError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        if isinstance(exc, Unreachable):
            sys.stderr.write(f"{PROG}: is the ingress running there? set --url or DISPATCHER_URL\n")
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
