"""The batch client (`python -m vertex_dispatch batch`) as a real process against a local stack."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import base_child_env
from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.integration

STANDIN = {"default": {"latency_s": 0.05}}


def write_input(path: Path, count: int, *, tag: str) -> list[str]:
    """A batch input of `count` lines with unique prompts; returns the prompts in order."""
    texts = [f"line {i} {tag}" for i in range(count)]
    with path.open("w") as handle:
        for text in texts:
            request = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
            handle.write(json.dumps({"request": request}) + "\n")
    return texts


def batch_command(stack: Stack, input_path: Path, output: Path, *extra: str) -> list[str]:
    """The argv of a batch run against the stack's ingress."""
    return [
        sys.executable,
        "-m",
        "vertex_dispatch",
        "batch",
        str(input_path),
        "--output",
        str(output),
        "--url",
        stack.ingress.url,
        *extra,
    ]


def run_batch(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a batch to its end."""
    return subprocess.run(
        command, env=base_child_env(), cwd=ROOT, capture_output=True, text=True, timeout=90
    )


def finished_in_journal(journal: Path) -> int:
    """How many lines the journal records as finished."""
    if not journal.exists():
        return 0
    records = [json.loads(text) for text in journal.read_text().splitlines() if text.endswith("}")]
    return sum(record["status"] != "pending" for record in records)


def read_output(output: Path) -> list[dict[str, Any]]:
    """The output records."""
    return [json.loads(text) for text in output.read_text().splitlines()]


def calls_per_prompt(stack: Stack, texts: list[str]) -> dict[str, int]:
    """How often the stand-in was called with each prompt."""
    calls = stack.standin_stats()["calls_by_text"]
    return {text: calls.get(text, 0) for text in texts}


def test_interrupted_batch_resumes_and_answers_every_line_once(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """200 lines, Ctrl-C after ~60, a re-run: 200 results in input order, each prompt sent once."""
    stack = stack_factory("memory", standin=STANDIN)
    texts = write_input(tmp_path / "in.jsonl", 200, tag=uuid.uuid4().hex)
    output = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.progress"
    command = batch_command(stack, tmp_path / "in.jsonl", output, "--concurrency", "8")

    first = subprocess.Popen(
        command,
        env=base_child_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while finished_in_journal(journal) < 60:
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run did not finish 60 lines in 60 s"
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        _, first_err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, first_err
    assert "to resume, run:" in first_err
    done_before = finished_in_journal(journal)
    assert 60 <= done_before < 200, "the interruption must land mid-run"
    assert not output.exists(), "an interrupted run writes only its journal"

    second = run_batch(command)

    assert second.returncode == 0, second.stderr
    records = read_output(output)
    assert [record["line"] for record in records] == list(range(1, 201))
    assert [record["request"]["contents"][0]["parts"][0]["text"] for record in records] == texts
    assert {record["status"] for record in records} == {"succeeded"}
    for record, text in zip(records, texts, strict=True):
        reply = record["response"]["candidates"][0]["content"]["parts"][0]["text"]
        assert reply == f"stand-in reply from {record['region']}: {text}"
    assert calls_per_prompt(stack, texts) == dict.fromkeys(texts, 1)
    assert f"{done_before} lines already done" in second.stdout
    assert not journal.exists(), "a complete run removes its journal"


def test_batch_rerun_without_its_journal_reattaches_by_idempotency_key(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """With output and journal gone, a re-run finds every job by its key: no new Vertex call."""
    stack = stack_factory("memory", standin=STANDIN)
    texts = write_input(tmp_path / "in.jsonl", 20, tag=uuid.uuid4().hex)
    output = tmp_path / "out.jsonl"
    command = batch_command(stack, tmp_path / "in.jsonl", output)
    assert run_batch(command).returncode == 0
    first_jobs = [record["job_id"] for record in read_output(output)]
    output.unlink()

    again = run_batch(command)

    assert again.returncode == 0, again.stderr
    assert [record["job_id"] for record in read_output(output)] == first_jobs
    assert "0 jobs submitted, 20 re-attached" in again.stdout
    assert calls_per_prompt(stack, texts) == dict.fromkeys(texts, 1)


def test_batch_with_a_rejected_line_reports_it_and_exits_1(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """A line the ingress refuses is recorded with its error, counted in the summary, exit 1."""
    stack = stack_factory("memory", standin=STANDIN)
    texts = write_input(tmp_path / "in.jsonl", 5, tag=uuid.uuid4().hex)
    lines = (tmp_path / "in.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["request"]["model"] = "no-such-model"
    lines[2] = json.dumps(bad)
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"

    done = run_batch(batch_command(stack, tmp_path / "in.jsonl", output))

    assert done.returncode == 1, done.stderr
    records = read_output(output)
    assert [record["status"] for record in records] == ["succeeded"] * 2 + ["rejected"] + [
        "succeeded"
    ] * 2
    assert records[2]["error"]["status"] == "INVALID_ARGUMENT"
    assert records[2]["job_id"] is None
    assert "rejected INVALID_ARGUMENT" in done.stdout
    assert calls_per_prompt(stack, texts)[texts[2]] == 0
