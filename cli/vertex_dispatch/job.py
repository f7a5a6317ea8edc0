"""The one-job commands: ``submit`` (with a spinner while it waits) and ``status``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any, Final, TextIO

from vertex_dispatch import PROG
from vertex_dispatch.client import (
    MAX_SERVER_WAIT_S,
    IngressClient,
    accepted_job_id,
    error_of,
    open_http_client,
    wait_for_job,
)
from vertex_dispatch.commands import EXIT_FAILED, EXIT_OK, StatusCommand, SubmitCommand
from vertex_dispatch.errors import ApiError, describe_error
from vertex_dispatch.progress import Spinner

SUBMIT_POLL_WAIT_S: Final = 2.0
"""``submit`` long-polls briefly: the ingress answers early only for a finished job, and the
spinner should show ``running`` soon after it starts."""


def response_text(result: Any) -> str | None:
    """The text of the first candidate of a GenerateContentResponse; None when it has none."""
    try:
        parts = result["candidates"][0]["content"]["parts"]
    except (KeyError, IndexError, TypeError):
        return None
    texts = [part["text"] for part in parts if isinstance(part, dict) and "text" in part]
    return "".join(texts) if texts else None


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
            spinner.clear()  # also before an error is printed
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
