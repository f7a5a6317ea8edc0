"""The command-line client (vertex_dispatch) without a process or a socket: its parts, and that
it is a package of its own."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import itertools
import json
import re
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import vertex_dispatch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from vertex_dispatch import batch, commands, errors, job, progress, report
from vertex_dispatch import client as api
from vertex_dispatch.batch import BatchLine, LineOutcome
from vertex_dispatch.commands import BatchCommand, StatusCommand, SubmitCommand
from vertex_dispatch.errors import CliError
from vertex_dispatch.progress import ProgressSnapshot
from vertex_dispatch.report import RunCounts

from dispatcher.jobs import JobStatus

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def request(text: str) -> dict[str, Any]:
    """A minimal GenerateContentRequest."""
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def batch_line(line: int, text: str | None = None) -> BatchLine:
    """A parsed input line whose prompt is `text` (default: "prompt LINE")."""
    body = request(text or f"prompt {line}")
    return BatchLine(line=line, request=body, request_sha256=batch.canonical_sha256(body))


def write_jsonl(path: Path, documents: list[Any]) -> Path:
    """Write one JSON document per line."""
    path.write_text("".join(json.dumps(document) + "\n" for document in documents))
    return path


# -- arguments -----------------------------------------------------------------------------


def test_submit_defaults() -> None:
    """`submit PROMPT` waits, prints text, and talks to the local ingress without auth."""
    command = commands.parse_command(["submit", "hello"], {})
    assert command == SubmitCommand(
        connection=api.Connection(url=commands.DEFAULT_URL, headers={}),
        prompt="hello",
        model=None,
        wait=True,
        json_output=False,
    )


@pytest.mark.parametrize(
    ("extra", "field", "expected"),
    [
        (["--no-wait"], "wait", False),
        (["--wait"], "wait", True),
        (["--json"], "json_output", True),
        (["--model", "gemini-x"], "model", "gemini-x"),
    ],
)
def test_submit_options(extra: list[str], field: str, expected: object) -> None:
    """Each submit option lands in its field."""
    command = commands.parse_command(["submit", "hello", *extra], {})
    assert getattr(command, field) == expected


def test_status_wait() -> None:
    """`status JOB --wait S` keeps the job id and the wait in seconds."""
    command = commands.parse_command(["status", "abc", "--wait", "2.5"], {})
    assert isinstance(command, StatusCommand)
    assert (command.job_id, command.wait_s) == ("abc", 2.5)


def test_batch_defaults(tmp_path: Path) -> None:
    """`batch IN.jsonl` writes IN.results.jsonl, 16 lines in flight, 30 s long polls."""
    command = commands.parse_command(["batch", str(tmp_path / "in.jsonl")], {})
    assert isinstance(command, BatchCommand)
    assert command.output == tmp_path / "in.results.jsonl"
    assert command.journal == tmp_path / "in.results.jsonl.progress"
    assert (command.concurrency, command.wait_s) == (16, 30.0)


@pytest.mark.parametrize(
    ("argv", "env", "url", "headers"),
    [
        ([], {"DISPATCHER_URL": "http://h:1/"}, "http://h:1", {}),
        (["--url", "https://a.run.app"], {"DISPATCHER_URL": "http://h:1"}, "https://a.run.app", {}),
        ([], {"DISPATCHER_API_KEY": "k"}, commands.DEFAULT_URL, {"Authorization": "Bearer k"}),
        (
            ["--api-key", "o"],
            {"DISPATCHER_API_KEY": "k"},
            commands.DEFAULT_URL,
            {"Authorization": "Bearer o"},
        ),
        ([], {"DISPATCHER_ID_TOKEN": "t"}, commands.DEFAULT_URL, {"Authorization": "Bearer t"}),
        (
            ["--id-token", "t"],
            {"DISPATCHER_API_KEY": "k"},
            commands.DEFAULT_URL,
            {"Authorization": "Bearer t", "X-API-Key": "k"},
        ),
    ],
)
def test_connection_from_options_and_env(
    argv: list[str], env: dict[str, str], url: str, headers: dict[str, str]
) -> None:
    """Options win over DISPATCHER_* variables; a key beside a token moves to X-API-Key."""
    command = commands.parse_command(["status", "abc", *argv], env)
    assert command.connection.url == url
    assert dict(command.connection.headers) == headers


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["batch", "in.jsonl", "--concurrency", "0"], "at least 1, got '0'"),
        (["batch", "in.jsonl", "--concurrency", "many"], "at least 1, got 'many'"),
        (["batch", "in.jsonl", "--wait-s", "61"], "at most 60 s per poll"),
        (["batch", "in.jsonl", "--wait-s", "-1"], "0 or more"),
        (["batch", "in.jsonl", "--output", "in.jsonl"], "must not be the input file"),
        (["status", "abc", "--max-retries", "-2"], "at least 0, got '-2'"),
        (["status", "abc", "--url", "ftp://h"], "expected http(s)://HOST"),
        (["status", "abc", "--url", "localhost:8080"], "expected http(s)://HOST"),
        (["submit"], "PROMPT"),
        ([], "COMMAND"),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad arguments exit with code 2 and say what is wrong."""
    with pytest.raises(SystemExit) as exited:
        commands.parse_command(argv, {})
    assert exited.value.code == commands.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("prompts.jsonl", "prompts.results.jsonl"),
        ("prompts.json", "prompts.json.results.jsonl"),
        ("prompts", "prompts.results.jsonl"),
    ],
)
def test_default_output_name(name: str, expected: str) -> None:
    """The default output sits next to the input with a .results.jsonl name."""
    assert commands.default_output(Path("/d") / name) == Path("/d") / expected


# -- batch input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"request": {',
            "not valid JSON: Expecting property name enclosed in double quotes (column 14)",
        ),
        ("[1, 2]", 'expected an object {"request": {...}}, got a list'),
        ('"text"', 'expected an object {"request": {...}}, got a string'),
        (
            '{"contents": []}',
            'no "request" field (each line is {"request": GenerateContentRequest}; '
            "keys found: 'contents')",
        ),
        ('{"request": null}', '"request" must be an object, got null'),
        (
            '{"request": {"contents": "hi"}}',
            "request.contents: required, a non-empty list (a string)",
        ),
        (
            '{"request": {"contents": []}}',
            "request.contents: required, a non-empty list (an empty list)",
        ),
        (
            '{"request": {"generationConfig": {}}}',
            "request.contents: required, a non-empty list (missing)",
        ),
    ],
)
def test_bad_input_line_says_why(text: str, message: str) -> None:
    """Each kind of bad line gets a message naming what is wrong."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        batch.parse_input_line(text)


def test_input_lines_keep_their_file_line_numbers(tmp_path: Path) -> None:
    """Blank lines are skipped but counted, a byte order mark is ignored, extra fields too."""
    path = tmp_path / "in.jsonl"
    body = json.dumps({"request": PROMPT, "note": "kept out"})
    path.write_bytes(b"\xef\xbb\xbf" + f"{body}\n\n  \n{body}\r\n".encode())
    parsed = batch.read_batch_input(path)
    assert [line.line for line in parsed.lines] == [1, 4]
    assert parsed.lines[0].request == PROMPT
    assert parsed.lines[0].request_sha256 == batch.canonical_sha256(PROMPT)


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    """All bad lines are listed as FILE:LINE: reason, at most ten, then a count."""
    path = tmp_path / "in.jsonl"
    good = json.dumps({"request": PROMPT})
    path.write_text("\n".join([good, "{", good, *["[]"] * 11]) + "\n")
    with pytest.raises(errors.BatchInputError) as raised:
        batch.read_batch_input(path)
    lines = str(raised.value).splitlines()
    assert (
        lines[0]
        == f"{path}:2: not valid JSON: Expecting property name enclosed in double quotes (column 2)"
    )
    assert lines[1] == f'{path}:4: expected an object {{"request": {{...}}}}, got a list'
    assert lines[-1] == "... and 2 more bad lines"
    assert len(lines) == 11


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no requests"),
        (b"\n\n", "no requests"),
        (
            b'{"request": {"contents": [1]}}\n{"x": "\xff"}\n',
            ":2: not UTF-8 (byte 0xff at column 8)",
        ),
    ],
)
def test_unusable_input_files(tmp_path: Path, content: bytes, message: str) -> None:
    """An empty file or one that is not UTF-8 is refused with the reason."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(errors.BatchInputError, match=re.escape(message)):
        batch.read_batch_input(path)


def test_missing_input_file(tmp_path: Path) -> None:
    """A missing input file is named in the error."""
    with pytest.raises(errors.BatchInputError, match=r"nope\.jsonl: cannot read: No such file"):
        batch.read_batch_input(tmp_path / "nope.jsonl")


def test_idempotency_key_depends_on_input_and_line() -> None:
    """The key is stable for an input and line, differs otherwise, and fits the 256-char limit."""
    key = batch.idempotency_key("a" * 64, 7)
    assert key == batch.idempotency_key("a" * 64, 7)
    assert key != batch.idempotency_key("a" * 64, 8)
    assert key != batch.idempotency_key("b" * 64, 7)
    assert key.startswith("vd-") and len(key) <= 256


def test_canonical_hash_ignores_key_order_and_spacing() -> None:
    """Two spellings of one request hash alike, so a reformatted file still resumes."""
    assert batch.canonical_sha256(json.loads('{"b": 1, "a": [2]}')) == batch.canonical_sha256(
        {"a": [2], "b": 1}
    )


# -- resume state --------------------------------------------------------------------------


def finished_record(line: BatchLine, status: str = "succeeded") -> dict[str, Any]:
    """An output record of a finished line."""
    return batch.output_record(line, status=status, job_id=f"job{line.line}", region="r1")


def pending_record(line: BatchLine, job_id: str) -> dict[str, Any]:
    """A journal record of a submitted line."""
    return {
        "line": line.line,
        "request_sha256": line.request_sha256,
        "job_id": job_id,
        "status": "pending",
    }


def plan(lines: list[BatchLine], *sources: list[Any]) -> batch.ResumeState:
    """plan_resume over in-memory sources, each a list of records at offsets 0, 1, 2..."""
    return batch.plan_resume(
        lines, [(Path(f"source{i}"), list(enumerate(records))) for i, records in enumerate(sources)]
    )


def test_finished_lines_are_skipped() -> None:
    """A finished record (any terminal status, or rejected) of an unchanged line is kept."""
    lines = [batch_line(1), batch_line(2), batch_line(3)]
    state = plan(lines, [finished_record(lines[0]), finished_record(lines[2], "rejected")])
    assert sorted(state.finished) == [1, 3]
    assert state.finished[3].outcome.status == "rejected"
    assert (state.finished[3].path, state.finished[3].offset) == (Path("source0"), 1)
    assert state.job_ids == {}


def test_a_changed_line_runs_again() -> None:
    """A record whose request differs from the line's current one is ignored."""
    old = batch_line(1, "old text")
    state = plan([batch_line(1, "new text")], [finished_record(old), pending_record(old, "j")])
    assert state.finished == {} and state.job_ids == {}
    assert state.ignored == 2


def test_submitted_lines_are_followed_not_resubmitted() -> None:
    """A journalled job id without a finished record is followed up; the latest id wins."""
    line = batch_line(1)
    state = plan([line], [pending_record(line, "first"), pending_record(line, "second")])
    assert state.job_ids == {1: "second"}


@pytest.mark.parametrize("finished_first", [True, False])
def test_a_finished_record_wins_over_a_pending_one(finished_first: bool) -> None:
    """Whatever the order, a finished line is never followed up again."""
    line = batch_line(1)
    records = [finished_record(line), pending_record(line, "j")]
    state = plan([line], records if finished_first else records[::-1])
    assert list(state.finished) == [1]
    assert state.job_ids == {}


def test_journal_records_extend_the_previous_output() -> None:
    """Lines finished in the journal join those finished in an earlier output."""
    lines = [batch_line(1), batch_line(2)]
    state = plan(lines, [finished_record(lines[0])], [finished_record(lines[1])])
    assert {n: ref.path for n, ref in state.finished.items()} == {
        1: Path("source0"),
        2: Path("source1"),
    }


@pytest.mark.parametrize(
    ("status", "job_id", "followed"),
    [("unsubmitted", None, False), ("lost", "j", True), ("running", "j", True)],
)
def test_unfinished_output_records_run_again(
    status: str, job_id: str | None, followed: bool
) -> None:
    """An output line without a final result is retried, following its job when it has one."""
    line = batch_line(1)
    record = batch.output_record(
        line, status=status, job_id=job_id, error={"status": "UNAVAILABLE"}
    )
    state = plan([line], [record])
    assert state.finished == {}
    assert state.job_ids == ({1: "j"} if followed else {})


@pytest.mark.parametrize(
    "record",
    [None, {"line": 99, "status": "succeeded", "request": PROMPT}, {"line": 1}, {"status": "x"}],
)
def test_records_of_no_line_are_counted_as_ignored(record: Any) -> None:
    """Unreadable records and records of lines not in the input are ignored and counted."""
    state = plan([batch_line(1)], [record])
    assert (state.finished, state.job_ids, state.ignored) == ({}, {}, 1)


def test_scan_records_gives_offsets_and_survives_a_torn_line(tmp_path: Path) -> None:
    """Each record comes with its byte offset; a torn last line reads as None."""
    path = tmp_path / "journal"
    path.write_bytes(b'{"a": 1}\n\n[1]\n{"b": ')
    assert list(batch.scan_records(path)) == [(0, {"a": 1}), (10, None), (14, None)]
    assert list(batch.scan_records(tmp_path / "missing")) == []


def test_journal_then_output_in_input_order(tmp_path: Path) -> None:
    """Records journalled in any order come out in input order, unfinished lines included."""
    lines = [batch_line(1), batch_line(2), batch_line(3)]
    journal = batch.Journal(tmp_path / "out.jsonl.progress")
    journal.job_accepted(lines[2], "job3")
    offset3 = journal.line_finished(finished_record(lines[2]))
    offset1 = journal.line_finished(finished_record(lines[0], "failed"))
    journal.close()
    finished = {
        n: batch.StoredRecord(outcome=LineOutcome(line=n, status="x"), path=journal.path, offset=o)
        for n, o in [(3, offset3), (1, offset1)]
    }
    unfinished = {2: batch.output_record(lines[1], status="unsubmitted", error={"code": 503})}
    batch.write_output(tmp_path / "out.jsonl", lines, finished, unfinished)
    written = [json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["line"], r["status"]) for r in written] == [
        (1, "failed"),
        (2, "unsubmitted"),
        (3, "succeeded"),
    ]
    assert written[0]["request"] == lines[0].request
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_resume_state_read_back_from_files(tmp_path: Path) -> None:
    """What a journal holds is what a re-run plans from, offsets included."""
    lines = [batch_line(1), batch_line(2)]
    journal = batch.Journal(tmp_path / "out.jsonl.progress")
    journal.job_accepted(lines[0], "job1")
    journal.job_accepted(lines[1], "job2")
    offset = journal.line_finished(finished_record(lines[1]))
    journal.close()
    state = batch.load_resume_state(lines, tmp_path / "out.jsonl", journal.path)
    assert state.job_ids == {1: "job1"}
    assert (state.finished[2].path, state.finished[2].offset) == (journal.path, offset)


def test_journal_starts_a_new_line_after_a_torn_one(tmp_path: Path) -> None:
    """A record is never glued onto a line torn by a crash."""
    path = tmp_path / "out.jsonl.progress"
    path.write_bytes(b'{"line": 1, "sta')
    journal = batch.Journal(path)
    journal.job_accepted(batch_line(2), "j")
    journal.close()
    assert [record for _, record in batch.scan_records(path)][1] == pending_record(
        batch_line(2), "j"
    )


def test_one_output_one_run(tmp_path: Path) -> None:
    """A second run on the same output is refused while the first holds the journal."""
    first = batch.Journal(tmp_path / "out.jsonl.progress")
    try:
        with pytest.raises(CliError, match="another vertex-dispatch batch is writing"):
            batch.Journal(tmp_path / "out.jsonl.progress")
    finally:
        first.close()


# -- outcomes and presentation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "label", "finished"),
    [
        ({"status": "succeeded"}, "succeeded", True),
        (
            {"status": "failed", "error": {"status": "INVALID_ARGUMENT"}},
            "failed INVALID_ARGUMENT",
            True,
        ),
        ({"status": "cancelled"}, "cancelled", True),
        (
            {"status": "rejected", "error": {"status": "PAYLOAD_TOO_LARGE"}},
            "rejected PAYLOAD_TOO_LARGE",
            True,
        ),
        (
            {"status": "unsubmitted", "error": {"status": "UNAVAILABLE"}},
            "unsubmitted UNAVAILABLE",
            False,
        ),
        ({"status": "running", "error": {"code": 500}}, "running", False),
    ],
)
def test_outcome_labels(record: dict[str, Any], label: str, finished: bool) -> None:
    """The summary groups lines by status and error status; only final ones are kept."""
    outcome = LineOutcome.from_record({"line": 1, **record})
    assert (outcome.label, outcome.finished) == (label, finished)


def test_record_from_a_failed_view() -> None:
    """A failed job's record carries its error and no response."""
    view = {
        "job_id": "j",
        "status": "failed",
        "region": "r",
        "attempts": 2,
        "error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "m"},
    }
    record = batch.record_from_view(batch_line(1), view)
    assert record == {
        "line": 1,
        "request": batch_line(1).request,
        "job_id": "j",
        "status": "failed",
        "region": "r",
        "attempts": 2,
        "error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "m"},
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (float("inf"), "?"), (0, "0:00"), (75.4, "1:15"), (3725, "1:02:05")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    """Durations read as M:SS or H:MM:SS."""
    assert report.format_duration(seconds) == text


def test_format_progress_for_logs() -> None:
    """A log line has done/total, percent, counts, rate, ETA and retries, in plain words."""
    snapshot = ProgressSnapshot(
        done=100, total=200, succeeded=98, failed=2, rate_per_s=20.0, retries=3
    )
    assert (
        progress.format_progress(snapshot)
        == "progress: 100/200 (50%), 98 succeeded, 2 failed, 20.0/s, ETA 0:05, 3 retries"
    )


def test_format_counts_after_the_bar() -> None:
    """On a terminal the bar is followed by the counts, rate, ETA and retries."""
    snapshot = ProgressSnapshot(
        done=100, total=200, succeeded=98, failed=2, rate_per_s=20.0, retries=3
    )
    assert progress.format_counts(snapshot) == "98 ok, 2 failed | 20.0/s | ETA 0:05 | 3 retries"


def test_progress_before_any_line_finished() -> None:
    """With no rate yet, the rate and ETA are unknown rather than made up."""
    snapshot = ProgressSnapshot(done=0, total=5, succeeded=0, failed=0, rate_per_s=None)
    assert (
        progress.format_progress(snapshot)
        == "progress: 0/5 (0%), 0 succeeded, 0 failed, -/s, ETA ?"
    )


def test_format_summary() -> None:
    """The summary has totals, a table per region and one per outcome."""
    outcomes = [
        LineOutcome(line=1, status="succeeded", region="us-central1"),
        LineOutcome(line=2, status="succeeded", region="europe-west4"),
        LineOutcome(line=3, status="failed", region="us-central1", error_status="INVALID_ARGUMENT"),
        LineOutcome(line=4, status="succeeded", region="us-central1"),
        LineOutcome(line=5, status="rejected", error_status="INVALID_ARGUMENT"),
    ]
    text = report.format_summary(
        outcomes, elapsed_s=83.25, counts=RunCounts(submitted=3, reattached=1, earlier=1)
    )
    assert text == (
        "5 lines in 1:23 (83.2 s): 3 succeeded, 2 did not\n"
        "this run: 3 jobs submitted, 1 re-attached, 1 lines already done\n"
        "\n"
        "region        jobs  succeeded  failed\n"
        "us-central1      3          2       1\n"
        "(no job)         1          0       1\n"
        "europe-west4     1          1       0\n"
        "total            5          3       2\n"
        "\n"
        "outcome                    lines\n"
        "succeeded                      3\n"
        "failed INVALID_ARGUMENT        1\n"
        "rejected INVALID_ARGUMENT      1"
    )


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_is_throttled_for_logs() -> None:
    """Without a terminal, at most one line per interval, and always a final line."""
    stream, clock = io.StringIO(), FakeClock()
    bar = progress.ProgressBar(stream=stream, total=4, earlier=[], tty=False, clock=clock)
    for line in range(1, 4):
        clock.now += 0.5
        bar.advance(LineOutcome(line=line, status="succeeded"))
    clock.now += progress.PLAIN_REFRESH_S
    bar.advance(LineOutcome(line=4, status="failed"))
    bar.close()
    assert stream.getvalue().splitlines() == [
        "progress: 1/4 (25%), 1 succeeded, 0 failed, 2.0/s, ETA 0:02",
        "progress: 4/4 (100%), 3 succeeded, 1 failed, 0.6/s, ETA 0:00",
    ]


def test_plain_progress_shows_a_heartbeat_when_nothing_changes() -> None:
    """Without a terminal, an unchanged state is printed again only after the heartbeat."""
    stream, clock = io.StringIO(), FakeClock()
    bar = progress.ProgressBar(stream=stream, total=4, earlier=[], tty=False, clock=clock)
    bar.render()
    clock.now += progress.PLAIN_REFRESH_S * 2
    bar.render()
    clock.now += progress.PLAIN_HEARTBEAT_S
    bar.render()
    assert len(stream.getvalue().splitlines()) == 2


def test_tty_progress_redraws_one_line() -> None:
    """On a terminal the bar is redrawn in place with \\r; a message gets its own line."""
    stream, clock = io.StringIO(), FakeClock()
    bar = progress.ProgressBar(
        stream=stream,
        total=2,
        earlier=[LineOutcome(line=1, status="succeeded")],
        tty=True,
        clock=clock,
    )
    clock.now += 1
    bar.advance(LineOutcome(line=2, status="succeeded"))
    bar.note("a message")
    bar.close()
    output = stream.getvalue()
    frames = [frame.rstrip() for frame in output.replace("\n", "\r").split("\r") if frame.strip()]
    assert frames == [
        "[##########..........] 1/2  50% | 1 ok, 0 failed | -/s | ETA ?",
        "[####################] 2/2 100% | 2 ok, 0 failed | 1.0/s | ETA 0:00",
        "a message",
        "[####################] 2/2 100% | 2 ok, 0 failed | 1.0/s | ETA 0:00",
        "[####################] 2/2 100% | 2 ok, 0 failed | 1.0/s | ETA 0:00",
    ]
    assert output.count("\n") == 2
    assert "\ra message\n" in output
    assert output.endswith("\n")


async def test_tty_spinner_turns_and_clears_its_line() -> None:
    """On a terminal the spinner redraws one line with the job's status and leaves none."""
    stream = io.StringIO()
    spinner = progress.Spinner(stream=stream, tty=True, job_id="j1")
    spinning = asyncio.create_task(spinner.spin())
    await asyncio.sleep(progress.TTY_REFRESH_S * 2.5)
    spinner.update("running")
    await asyncio.sleep(progress.TTY_REFRESH_S * 1.5)
    spinning.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await spinning
    spinner.clear()
    output = stream.getvalue()
    frames = [frame for frame in output.split("\r") if frame.strip()]
    frames_expected = [progress.SPINNER_FRAMES[i % 4] for i in range(len(frames))]
    assert [frame[0] for frame in frames] == frames_expected
    assert re.fullmatch(r"\| job j1: pending \d+\.\ds", frames[0])
    assert re.fullmatch(r". job j1: running \d+\.\ds", frames[-1])
    assert "\n" not in output
    assert output.endswith("\r") and not output.split("\r")[-2].strip()


async def test_plain_spinner_prints_a_line_per_status() -> None:
    """Without a terminal, the spinner prints one line per status and nothing else."""
    stream = io.StringIO()
    spinner = progress.Spinner(stream=stream, tty=False, job_id="j1")
    await spinner.spin()
    for status in ["pending", "running", "running", "succeeded"]:
        spinner.update(status)
    spinner.clear()
    assert stream.getvalue() == "job j1: pending\njob j1: running\njob j1: succeeded\n"


@pytest.mark.parametrize(
    ("result", "text"),
    [
        (
            {
                "candidates": [
                    {"content": {"parts": [{"text": "a"}, {"thought": 1}, {"text": "b"}]}}
                ]
            },
            "ab",
        ),
        ({"candidates": [{"finishReason": "SAFETY"}]}, None),
        ({"candidates": []}, None),
        (None, None),
    ],
)
def test_response_text(result: Any, text: str | None) -> None:
    """The first candidate's text parts, joined; None when there are none."""
    assert job.response_text(result) == text


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (
            {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad"},
            "400 INVALID_ARGUMENT: bad",
        ),
        ({"message": "only this"}, "only this"),
        ({"code": 503}, "503"),
        ({}, "unknown error"),
    ],
)
def test_describe_error(error: dict[str, Any], text: str) -> None:
    """Errors read as CODE STATUS: message, with whatever parts exist."""
    assert errors.describe_error(error) == text


# -- retries and polling -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "retry_after", "jitter", "delay"),
    [
        (0, None, 0.0, 0.25),
        (0, None, 0.999, 0.49975),
        (3, None, 0.0, 2.0),
        (20, None, 0.0, 15.0),
        (0, 7.0, 0.5, 7.0),
        (5, 0.0, 0.5, api.RETRY_MIN_S),
        (0, 9999.0, 0.5, api.RETRY_AFTER_MAX_S),
    ],
)
def test_retry_delay(attempt: int, retry_after: float | None, jitter: float, delay: float) -> None:
    """Retry-After is honoured within bounds; otherwise exponential backoff with jitter, capped."""
    assert api.retry_delay(attempt, retry_after, jitter=jitter) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5", 5.0),
        (" 0 ", 0.0),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 40.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ("soon", None),
        ("-3", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    """Retry-After as seconds or an HTTP date; unreadable values are None."""
    assert api.parse_retry_after(header, now=60.0) == seconds


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], *, max_retries: int = 3
) -> tuple[httpx.AsyncClient, api.IngressClient]:
    """An IngressClient over an in-process transport (no network)."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    connection = api.Connection(url="http://ingress.test", headers={}, max_retries=max_retries)
    return http, api.IngressClient(http, connection)


async def test_backpressure_is_retried_with_the_same_key() -> None:
    """429 and 503 are retried after Retry-After, always with the same Idempotency-Key."""
    answers = [
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": {"code": 429}}),
        httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"code": 503}}),
        httpx.Response(202, json={"job_id": "j", "status": "pending"}),
    ]
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        return answers[len(keys) - 1]

    http, client = mock_client(handler)
    async with http:
        response = await client.submit(PROMPT, key="k1")
    assert response.status_code == 202
    assert keys == ["k1", "k1", "k1"]


@pytest.mark.parametrize(("code", "calls"), [(400, 1), (500, 1), (503, 3)])
async def test_retries_are_bounded_and_only_for_transient_answers(code: int, calls: int) -> None:
    """Client errors are not retried; transient ones at most max_retries times."""
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return httpx.Response(code, headers={"Retry-After": "0"})

    http, client = mock_client(handler, max_retries=2)
    async with http:
        response = await client.submit(PROMPT, key="k")
    assert (response.status_code, len(seen)) == (code, calls)


async def test_busy_answers_are_retried_for_a_time_not_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 429 is retried after Retry-After whatever max_retries says, until the patience is spent."""
    monkeypatch.setattr(api, "BUSY_PATIENCE_S", 2.5 * api.RETRY_MIN_S)
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(429, headers={"Retry-After": "0"})

    http, client = mock_client(handler, max_retries=0)
    async with http:
        response = await client.submit(PROMPT, key="k")
    assert (response.status_code, len(calls)) == (429, 3)


async def test_connection_errors_end_as_unreachable() -> None:
    """A connection error after the last retry is reported with the URL."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http, client = mock_client(handler, max_retries=0)
    async with http:
        with pytest.raises(
            errors.Unreachable, match=r"POST http://ingress.test/generate: ConnectError"
        ):
            await client.submit(PROMPT, key="k")


async def test_polling_an_ingress_that_ignores_wait_sleeps_between_polls() -> None:
    """When ?wait is not honoured, polls are spaced out (0.1 s, then growing): no busy loop."""
    polls: list[tuple[float, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append((time.monotonic(), request.url.params.get("wait")))
        status = "succeeded" if len(polls) == 3 else "running"
        return httpx.Response(200, json={"job_id": "j", "status": status})

    http, client = mock_client(handler)
    async with http:
        view = await api.wait_for_job(client, "j", wait_s=30)
    assert view["status"] == "succeeded"
    assert [wait for _, wait in polls] == ["30", "30", "30"]
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(polls)]
    assert gaps[0] >= api.POLL_INITIAL_S * 0.9 and gaps[1] >= api.POLL_INITIAL_S * 1.4


async def test_job_errors_carry_the_http_status() -> None:
    """A 404 for a job is an ApiError with its status and the ingress's message."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            404, json={"error": {"code": 404, "status": "NOT_FOUND", "message": "no job j"}}
        )

    http, client = mock_client(handler)
    async with http:
        with pytest.raises(errors.ApiError, match="GET /jobs/j: 404 NOT_FOUND: no job j") as raised:
            await client.job("j", wait_s=None)
    assert raised.value.http_status == 404


# -- a package of its own ------------------------------------------------------------------

CLI_DISTRIBUTION = "vertex-dispatcher-cli"
SERVICES_DISTRIBUTION = "vertex-dispatcher"
SERVICE_STACK = {"grpcio", "grpcio-status", "protobuf", "proto-plus", "starlette", "uvicorn"}
"""What the services' Google clients and web stack bring, beside their direct requirements."""
FORBIDDEN_IMPORTS = {"dispatcher", "ingress", "worker", "google"}
PACKAGE_DIR = Path(vertex_dispatch.__file__).parent


def test_terminal_states_are_the_job_models() -> None:
    """The client's terminal statuses are exactly the job model's terminal statuses."""
    assert {status.value for status in JobStatus if status.is_terminal} == api.TERMINAL


def dependency_closure(name: str) -> set[str]:
    """Every distribution `name` installs, itself included, markers evaluated for this machine."""
    closure: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        current, extras = todo.pop()
        key = (canonicalize_name(current), extras)
        if key in seen:
            continue
        seen.add(key)
        closure.add(key[0])
        for text in metadata.distribution(current).requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in extras or {""}
            ):
                continue
            todo.append((requirement.name, frozenset(requirement.extras)))
    return closure


def services_own_dependencies() -> set[str]:
    """The services' direct requirements (no extras) that the CLI does not declare itself."""
    requirements = [Requirement(text) for text in metadata.requires(SERVICES_DISTRIBUTION) or []]
    cli_declared = {Requirement(text).name for text in metadata.requires(CLI_DISTRIBUTION) or []}
    services: set[str] = {
        canonicalize_name(requirement.name)
        for requirement in requirements
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""})
    }
    return services - {canonicalize_name(name) for name in cli_declared}


def test_cli_installs_no_google_library_and_nothing_of_the_services() -> None:
    """The CLI's dependency closure holds no google-* distribution and no service dependency."""
    closure = dependency_closure(CLI_DISTRIBUTION)
    assert {"httpx", "tqdm"} <= closure, "the walk must find the CLI's real dependencies"
    assert {"google-cloud-firestore", "starlette"} <= services_own_dependencies()
    assert {name for name in closure if name.startswith("google")} == set()
    assert closure & (services_own_dependencies() | SERVICE_STACK) == set()


def imported_top_levels(path: Path) -> set[str]:
    """The top-level packages a module imports (absolute imports; relative ones are its own)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


CLI_MODULES = sorted(PACKAGE_DIR.rglob("*.py"))


def test_the_cli_has_modules_to_check() -> None:
    """The static import check below sees the package's modules (the walk is not empty)."""
    assert {path.name for path in CLI_MODULES} >= {"__main__.py", "client.py", "batch.py"}


@pytest.mark.parametrize("path", CLI_MODULES, ids=lambda path: path.name)
def test_cli_modules_import_nothing_of_the_services_or_google(path: Path) -> None:
    """No module of vertex_dispatch imports dispatcher, ingress, worker or google."""
    assert imported_top_levels(path) & FORBIDDEN_IMPORTS == set()
