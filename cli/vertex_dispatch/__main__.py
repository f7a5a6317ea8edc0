"""The entry point: ``vertex-dispatch`` (the console script) and ``python -m vertex_dispatch``."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from vertex_dispatch import PROG
from vertex_dispatch.batch_run import run_batch
from vertex_dispatch.commands import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    BatchCommand,
    SubmitCommand,
    parse_command,
)
from vertex_dispatch.errors import CliError, Unreachable
from vertex_dispatch.job import run_status, run_submit


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
