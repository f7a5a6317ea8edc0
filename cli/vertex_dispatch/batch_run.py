"""``vertex-dispatch batch``: every line of an input file as a job, resumably.

Ctrl-C once: no more submissions; requests already sent finish and their job ids are
journalled, jobs being followed are left to run on the ingress. Twice: stop at once. The
files (input, journal, output) and the resume rules are in ``batch``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final, TextIO

from vertex_dispatch import PROG
from vertex_dispatch.batch import (
    REJECTED,
    UNSUBMITTED,
    BatchInput,
    BatchLine,
    Journal,
    LineOutcome,
    ResumeState,
    StoredRecord,
    idempotency_key,
    load_resume_state,
    output_record,
    read_batch_input,
    record_from_view,
    write_output,
)
from vertex_dispatch.client import (
    IngressClient,
    accepted_job_id,
    error_of,
    open_http_client,
    unreachable_error,
    wait_for_job,
)
from vertex_dispatch.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    BatchCommand,
)
from vertex_dispatch.errors import ApiError, CliError, Stopped, Unreachable
from vertex_dispatch.progress import PLAIN_REFRESH_S, TTY_REFRESH_S, ProgressBar
from vertex_dispatch.report import RunCounts, format_summary

REJECTED_STATUS: Final = frozenset({400, 409, 413, 422})
FATAL_STATUS: Final = frozenset({401, 403, 404, 405})
"""Answers to ``POST /generate`` that no line can get past: credentials or the URL are wrong."""


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
