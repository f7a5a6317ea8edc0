"""The command line: ``vertex-dispatch submit | status | batch`` parsed into a command."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vertex_dispatch import PROG
from vertex_dispatch.client import (
    DEFAULT_MAX_RETRIES,
    MAX_SERVER_WAIT_S,
    Connection,
    auth_headers,
    base_url,
)
from vertex_dispatch.errors import CliError

DEFAULT_URL: Final = "http://127.0.0.1:8080"
DEFAULT_CONCURRENCY: Final = 16
DEFAULT_BATCH_WAIT_S: Final = 30.0

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""A job (or some batch line) did not succeed."""
EXIT_USAGE: Final = 2
"""Bad arguments or input, or the ingress refused or could not be reached."""
EXIT_INTERRUPTED: Final = 130
"""Stopped by Ctrl-C (128 + SIGINT, as shells report it)."""


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


def default_output(input_path: Path) -> Path:
    """``prompts.jsonl`` → ``prompts.results.jsonl``, next to the input."""
    stem = input_path.name.removesuffix(".jsonl")
    return input_path.with_name(f"{stem}.results.jsonl")
