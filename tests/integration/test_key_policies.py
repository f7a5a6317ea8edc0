"""Per-API-key policies end to end: real ingress processes reading a keys file with
policy words, answering 429 and 403 for them, showing them at `GET /keys/me`, and
re-reading the file on change or SIGHUP without a restart.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dispatcher.tenants import POLICY_CACHE_S
from tests.support.stack import MODEL, Stack, prompt, unique

pytestmark = pytest.mark.integration
KEYS = {name: f"{name}-{name[0] * 40}" for name in ("alice", "bob", "carol", "dave", "erin")}
PASTED_KEY = "sk-live-" + "9" * 32
RELOAD_WITHIN_S = 2.0  # KeyRing.RECHECK_S (1 s) and some slack


def key_line(name: str, *words: str) -> str:
    """One keys-file line: the name, the hash of the key, the policy words."""
    digest = hashlib.sha256(KEYS[name].encode()).hexdigest()
    return " ".join((f"{name}:{digest}", *words))


def write_keys(path: Path, *lines: str, keep_mtime: bool = False) -> None:
    """Write the keys file; its mtime moves on (a later edit) unless `keep_mtime`."""
    before = path.stat() if path.exists() else None
    path.write_text("\n".join(lines) + "\n")
    if before is None:
        return
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        later = before.st_mtime_ns + 5 * 10**9
        os.utime(path, ns=(later, later))


def keys_file(tmp_path: Path, *lines: str) -> Path:
    """A fresh API_KEYS_FILE with these lines."""
    path = tmp_path / "api-keys"
    write_keys(path, *lines)
    return path


def as_(name: str) -> dict[str, str]:
    """Headers presenting a caller's key."""
    return {"X-API-Key": KEYS[name]}


def submit(stack: Stack, name: str) -> httpx.Response:
    """POST /generate of a fresh prompt as `name`."""
    return stack.submit(prompt(unique(name)), headers=as_(name))


def wait_accepted(stack: Stack, name: str, timeout: float) -> float:
    """Submit as `name` until it is accepted (202, not 401); the seconds that took."""
    started = time.monotonic()
    while True:
        response = submit(stack, name)
        if response.status_code == 202:
            return time.monotonic() - started
        assert response.status_code == 401, response.text
        assert time.monotonic() - started < timeout, f"{name} still refused after {timeout} s"
        time.sleep(0.05)


def hup(stack: Stack) -> None:
    """SIGHUP to the ingress process (itself, not its group)."""
    os.kill(stack.ingress.process.pid, signal.SIGHUP)


def test_rpm_over_http_is_429_with_retry_after(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """rpm=2: 202, 202, then 429 RESOURCE_EXHAUSTED naming rpm with Retry-After; another
    key is unaffected and the refusal is counted at /metrics."""
    path = keys_file(tmp_path, key_line("alice", "rpm=2"), key_line("bob"))
    stack = stack_factory("memory", API_KEYS_FILE=str(path))
    assert [submit(stack, "alice").status_code for _ in range(2)] == [202, 202]
    refused = submit(stack, "alice")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert "rpm" in error["message"] and "alice" in error["message"]
    # One request back at 2 a minute: 30 s, less what has passed since the bucket was full.
    assert 28 <= int(refused.headers["Retry-After"]) <= 30
    assert [submit(stack, "bob").status_code for _ in range(5)] == [202] * 5
    metrics = stack.http.get(f"{stack.ingress.url}/metrics", headers=as_("bob")).text
    assert re.search(
        r'^dispatcher_key_refusals_total\{caller="alice",limit="rpm"\} 1\.0$', metrics, re.M
    ), metrics


def test_model_not_allowed_is_403(stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    """A key with models=other gets 403 PERMISSION_DENIED for the default model, naming both."""
    path = keys_file(tmp_path, key_line("carol", "models=other"), key_line("bob"))
    stack = stack_factory("memory", API_KEYS_FILE=str(path))
    refused = submit(stack, "carol")
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["status"]) == (403, "PERMISSION_DENIED")
    assert MODEL in error["message"] and "allowed: other" in error["message"]
    assert submit(stack, "bob").status_code == 202


def test_keys_me_shows_the_policy_and_what_is_left(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """GET /keys/me answers the caller's name, policy, rates left and unfinished jobs."""
    path = keys_file(
        tmp_path,
        key_line("alice", "rpm=5", "tpm=1000", "tokens_per_day=50000", "budget=warn"),
        key_line("bob"),
    )
    stack = stack_factory("memory", API_KEYS_FILE=str(path))
    assert submit(stack, "alice").status_code == 202
    me = stack.http.get(f"{stack.ingress.url}/keys/me", headers=as_("alice"))
    assert me.status_code == 200, me.text
    body = me.json()
    assert body["name"] == "alice"
    assert body["policy"] == {
        "rpm": 5,
        "tpm": 1000,
        "tokens_per_day": 50000,
        "tokens_per_month": None,
        "budget": "warn",
        "max_unfinished": None,
        "priority": "interactive",
        "weight": 1.0,
        "models": None,
        "tiers": None,
        "default_tier": None,
    }
    left = body["remaining_per_minute"]
    assert 4.0 <= left["rpm"] < 4.5, left  # one request spent, a little refilled
    assert 990 <= left["tpm"] < 1000, left  # a few estimated tokens spent
    assert body["unfinished"] in (0, 1)
    bob = stack.http.get(f"{stack.ingress.url}/keys/me", headers=as_("bob")).json()
    assert bob["name"] == "bob"
    assert bob["remaining_per_minute"] == {"rpm": None, "tpm": None}
    assert stack.http.get(f"{stack.ingress.url}/keys/me").status_code == 401


def test_keys_me_is_404_with_keys_off(stack_factory: Callable[..., Stack]) -> None:
    """Without API_KEYS_FILE there is no key to show: 404 NOT_FOUND."""
    stack = stack_factory("memory")
    response = stack.http.get(f"{stack.ingress.url}/keys/me")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["status"] == "NOT_FOUND"


def test_edited_keys_file_is_read_without_a_restart(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """A key added to the file (mtime moved on) is let in within ~2 s, no restart; its
    policy holds from then on."""
    path = keys_file(tmp_path, key_line("alice"))
    stack = stack_factory("memory", API_KEYS_FILE=str(path))
    pid = stack.ingress.process.pid
    assert submit(stack, "dave").status_code == 401
    write_keys(path, key_line("alice"), key_line("dave", "rpm=1"))
    assert wait_accepted(stack, "dave", timeout=RELOAD_WITHIN_S + 1) < RELOAD_WITHIN_S
    assert submit(stack, "dave").status_code == 429, "its rpm=1 applies"
    assert submit(stack, "alice").status_code == 202
    assert stack.ingress.process.poll() is None and stack.ingress.process.pid == pid


def test_sighup_reloads_the_keys_file_at_once(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """SIGHUP re-reads the file at once, even an edit that kept the file's mtime."""
    path = keys_file(tmp_path, key_line("alice"))
    stack = stack_factory("memory", API_KEYS_FILE=str(path))
    write_keys(path, key_line("alice"), key_line("erin"), keep_mtime=True)
    time.sleep(1.5)  # past RECHECK_S: the watcher looked and saw the same mtime
    assert submit(stack, "erin").status_code == 401
    hup(stack)
    assert wait_accepted(stack, "erin", timeout=1.0) < 1.0
    assert stack.ingress.process.poll() is None, "SIGHUP must not end the ingress"
    assert "API keys reloaded" in stack.ingress.log_text()


def test_broken_edit_keeps_the_old_keys(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """A keys file that no longer parses, by change or SIGHUP, leaves the old keys working
    and its content out of the log; a good edit afterwards is picked up."""
    path = keys_file(tmp_path, key_line("alice"), key_line("bob", "rpm=100"))
    stack = stack_factory("memory", API_KEYS_FILE=str(path))
    write_keys(path, key_line("alice"), key_line("bob", PASTED_KEY), key_line("dave"))
    time.sleep(RELOAD_WITHIN_S)
    hup(stack)
    time.sleep(0.3)
    assert submit(stack, "alice").status_code == 202
    assert submit(stack, "bob").status_code == 202
    assert submit(stack, "dave").status_code == 401, "nothing of the broken file applies"
    assert stack.ingress.process.poll() is None
    log = stack.ingress.log_text()
    assert "API keys file not reloaded" in log
    assert PASTED_KEY not in log
    write_keys(path, key_line("alice"), key_line("dave"))
    assert wait_accepted(stack, "dave", timeout=RELOAD_WITHIN_S + 1) < RELOAD_WITHIN_S
    assert submit(stack, "bob").status_code == 401, "bob left the file"


def test_max_unfinished_in_pubsub_mode(stack_factory: Callable[..., Stack], tmp_path: Path) -> None:
    """max_unfinished=1 (mode 3, 8 s stand-in calls): the count is read at the first
    submission (0) and cached POLICY_CACHE_S, so a second one straight after is accepted
    (the documented overshoot); once the cache has expired, with both still unfinished, the
    third is refused 429 naming max_unfinished; when both are done, a later one is accepted.

    The stand-in takes 8 s rather than 3: at 3 s both jobs would be finished before the
    5 s cache expires, and the refusal could not be seen.
    """
    latency_s = 8.0
    assert latency_s > POLICY_CACHE_S + 1
    path = keys_file(tmp_path, key_line("alice", "max_unfinished=1"), key_line("bob"))
    stack = stack_factory(
        "pubsub", API_KEYS_FILE=str(path), standin={"default": {"latency_s": latency_s}}
    )
    read_at = time.monotonic()
    first, second = submit(stack, "alice"), submit(stack, "alice")
    assert (first.status_code, second.status_code) == (202, 202), second.text
    time.sleep(max(0.0, read_at + POLICY_CACHE_S + 0.3 - time.monotonic()))
    assert time.monotonic() - read_at < latency_s, "the jobs must still be running"
    refused = submit(stack, "alice")
    reread_at = time.monotonic()
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"
    assert "2 unfinished jobs" in error["message"] and "max_unfinished is 1" in error["message"]
    assert refused.headers["Retry-After"] == str(int(POLICY_CACHE_S))
    assert submit(stack, "bob").status_code == 202, "another key is unaffected"
    for response in (first, second):
        job_id = response.json()["job_id"]
        deadline = time.monotonic() + 60
        while True:
            status = stack.http.get(
                f"{stack.ingress.url}/jobs/{job_id}", headers=as_("alice")
            ).json()["status"]
            if status == "succeeded":
                break
            assert time.monotonic() < deadline, f"{job_id} still {status}"
            time.sleep(0.1)
    time.sleep(max(0.0, reread_at + POLICY_CACHE_S + 0.3 - time.monotonic()))
    assert submit(stack, "alice").status_code == 202


def test_a_key_rate_holds_for_the_service_across_mode_3_ingresses(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """With two mode-3 ingresses counting each other (ingress heartbeats), each holds half
    of a key's rpm: eight quick requests spread over both accept rpm=4 of them, not 8."""
    path = keys_file(tmp_path, key_line("alice", "rpm=4"))
    stack = stack_factory("pubsub", ingresses=2, API_KEYS_FILE=str(path), REGION_SYNC_S="0.3")
    time.sleep(1.5)  # a few heartbeat rounds: each ingress has counted the other
    statuses = [
        stack.submit(prompt(unique("share")), ingress=i % 2, headers=as_("alice")).status_code
        for i in range(8)
    ]
    assert sorted(statuses) == [202] * 4 + [429] * 4


def test_an_interactive_job_overtakes_a_batch_backlog_in_mode_3(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    """Mode 3 with INTERACTIVE_TOPIC (its own push subscription, as deploy.sh makes it):
    alice (batch) queues 40 jobs of 0.5 s calls; bob's (interactive) job, sent after,
    is final while most of alice's are not, and within a few calls' time, because neither
    Pub/Sub's backlog nor the worker's region slots put it behind hers."""
    path = keys_file(
        tmp_path, key_line("alice", "priority=batch"), key_line("bob", "priority=interactive")
    )
    stack = stack_factory(
        "pubsub",
        API_KEYS_FILE=str(path),
        INTERACTIVE_TOPIC=unique("interactive"),
        standin={"default": {"latency_s": 0.5}},
    )
    backlog = [submit(stack, "alice") for _ in range(40)]
    assert all(response.status_code == 202 for response in backlog)
    time.sleep(1.0)  # the backlog is in Pub/Sub and the worker
    sent = time.monotonic()
    job_id = submit(stack, "bob").json()["job_id"]
    view = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", headers=as_("bob")).json()
    while view["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() - sent < 30, f"bob's job still {view['status']}"
        time.sleep(0.05)
        view = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", headers=as_("bob")).json()
    waited = time.monotonic() - sent
    counts = stack.http.get(
        f"{stack.ingress.url}/jobs", params={"page_size": 1}, headers=as_("alice")
    ).json()["counts"]
    assert view["status"] == "succeeded"
    assert counts["pending"] + counts["running"] >= 20, counts
    assert waited < 5.0, f"bob waited {waited:.1f} s behind alice's backlog"
    assert stack.worker is not None
    metrics = stack.http.get(f"{stack.worker.url}/metrics").text
    waits = {
        (caller, priority): float(count)
        for caller, priority, count in re.findall(
            r'^dispatcher_key_queue_wait_seconds_count\{caller="(\w+)",priority="(\w+)"\} (\S+)$',
            metrics,
            re.M,
        )
    }
    assert waits[("bob", "interactive")] == 1.0 and waits[("alice", "batch")] >= 1.0, waits
