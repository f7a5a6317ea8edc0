"""Fitting the ecosystem: the google-genai SDK, idempotency, long-poll, cancel, metrics, logs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.oauth2.credentials import Credentials

from tests.support.stack import MODEL, PROJECT, REGIONS, Stack, prompt, unique

pytestmark = pytest.mark.integration


def sdk_client(stack: Stack, api_version: str | None = None) -> genai.Client:
    """The real google-genai SDK in Vertex mode, pointed at the ingress (a static token)."""
    options = types.HttpOptions(base_url=f"{stack.ingress.url}/")
    if api_version:
        options = types.HttpOptions(base_url=f"{stack.ingress.url}/", api_version=api_version)
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location="us-central1",
        credentials=Credentials(token="test"),
        http_options=options,
    )


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
@pytest.mark.parametrize("api_version", [None, "v1"])
def test_google_genai_sdk_generates_through_the_dispatcher(
    stack_factory: Callable[..., Stack], mode: str, api_version: str | None
) -> None:
    """generate_content through the SDK (v1beta1 by default, and v1) returns Vertex's response."""
    stack = stack_factory(mode)
    text = unique("sdk")
    client = sdk_client(stack, api_version)  # keep it referenced: the SDK closes on collection
    response = client.models.generate_content(model=MODEL, contents=text)
    assert response.text is not None
    region, _, echoed = response.text.removeprefix("stand-in reply from ").partition(": ")
    assert region in REGIONS
    assert echoed == text
    assert response.usage_metadata is not None and response.usage_metadata.total_token_count


def test_sdk_sees_vertex_errors(stack_factory: Callable[..., Stack]) -> None:
    """A permanent Vertex error reaches the SDK as Vertex's own error (ClientError 400)."""
    stack = stack_factory("memory", standin={"default": {"status": 400}})
    client = sdk_client(stack)
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model=MODEL, contents="x")
    assert caught.value.code == 400
    assert caught.value.status == "INVALID_ARGUMENT"


def test_sdk_unknown_model_is_404(stack_factory: Callable[..., Stack]) -> None:
    """A model not in MODEL_CONFIG is refused with 404, as Vertex does for unknown models."""
    stack = stack_factory("memory")
    client = sdk_client(stack)
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gemini-unknown", contents="x")
    assert caught.value.code == 404


def test_sdk_stream_gets_the_whole_response_as_one_chunk(
    stack_factory: Callable[..., Stack],
) -> None:
    """streamGenerateContent answers one chunk holding the whole response."""
    stack = stack_factory("memory")
    text = unique("stream")
    client = sdk_client(stack)
    chunks = list(client.models.generate_content_stream(model=MODEL, contents=text))
    assert len(chunks) == 1
    assert chunks[0].text is not None and chunks[0].text.endswith(text)


def test_transient_errors_are_retried_behind_the_sdk(stack_factory: Callable[..., Stack]) -> None:
    """A region answering 503 is failed over behind the synchronous route; the SDK sees success."""
    stack = stack_factory("memory", standin={"regions": {r: {"script": [503]} for r in REGIONS}})
    client = sdk_client(stack)
    response = client.models.generate_content(model=MODEL, contents="retry me")
    assert response.text is not None and response.text.endswith("retry me")


def test_same_idempotency_key_returns_the_same_job(stack_factory: Callable[..., Stack]) -> None:
    """The same key with the same body gives the same job, once; the stand-in is called once."""
    stack = stack_factory("memory")
    text = unique("idem")
    headers = {"Idempotency-Key": unique("key")}
    first = stack.submit(prompt(text), headers=headers)
    second = stack.submit(prompt(text), headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    assert second.headers["idempotent-replayed"] == "true"
    stack.wait(first.json()["job_id"])
    third = stack.submit(prompt(text), headers=headers)
    assert third.json()["job_id"] == first.json()["job_id"]
    assert third.json()["status"] == "succeeded"
    assert stack.standin_stats()["calls_by_text"][text] == 1


def test_idempotency_key_with_another_body_is_409(stack_factory: Callable[..., Stack]) -> None:
    """Reusing a key for a different request is a conflict, in the error shape."""
    stack = stack_factory("memory")
    headers = {"Idempotency-Key": unique("key")}
    assert stack.submit(prompt("one"), headers=headers).status_code == 202
    conflict = stack.submit(prompt("two"), headers=headers)
    assert conflict.status_code == 409
    assert "Idempotency-Key" in conflict.json()["error"]["message"]


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_long_poll_returns_as_soon_as_the_job_finishes(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """GET ?wait=20 on a job taking ~1 s answers succeeded after about 1 s, not 20."""
    stack = stack_factory(mode, standin={"default": {"latency_s": 1.0}})
    job_id = stack.submit_ok(unique("poll"))
    started = time.monotonic()
    view = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", params={"wait": "20"}).json()
    took = time.monotonic() - started
    assert view["status"] == "succeeded"
    assert took < 10


def test_long_poll_times_out_with_the_current_state(stack_factory: Callable[..., Stack]) -> None:
    """GET ?wait=1 on a slow job answers after about 1 s with its unfinished state."""
    stack = stack_factory("memory", standin={"default": {"latency_s": 10}})
    job_id = stack.submit_ok(unique("slow"))
    started = time.monotonic()
    view = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", params={"wait": "1"}).json()
    took = time.monotonic() - started
    assert view["status"] in ("pending", "running")
    assert 0.9 <= took < 5


@pytest.mark.parametrize("wait", ["soon", "-1", "nan", "1e9"])
def test_bad_wait_is_400(stack_factory: Callable[..., Stack], wait: str) -> None:
    """A wait that is not a number of seconds is refused with a message."""
    stack = stack_factory("memory")
    job_id = stack.submit_ok("w")
    response = stack.http.get(f"{stack.ingress.url}/jobs/{job_id}", params={"wait": wait})
    assert response.status_code == 400
    assert "wait" in response.json()["error"]["message"]


def test_cancel_before_start_and_too_late(stack_factory: Callable[..., Stack]) -> None:
    """A queued job is cancelled and never called; a running one answers 409 and runs on."""
    stack = stack_factory("memory", standin={"default": {"latency_s": 2}}, EXECUTOR_CONCURRENCY="1")
    running = stack.submit_ok(unique("busy"))
    queued_text = unique("queued")
    queued = stack.submit_ok(queued_text)
    while stack.job(running)["status"] != "running":
        time.sleep(0.02)
    cancelled = stack.http.delete(f"{stack.ingress.url}/jobs/{queued}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    too_late = stack.http.delete(f"{stack.ingress.url}/jobs/{running}")
    assert too_late.status_code == 409
    assert "too late" in too_late.json()["error"]["message"]
    assert stack.wait(running)["status"] == "succeeded"
    time.sleep(0.5)
    assert stack.job(queued)["status"] == "cancelled"
    assert queued_text not in stack.standin_stats()["calls_by_text"]


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if metric == name and found == wanted:
            return float(value)
    return 0.0


@pytest.mark.parametrize("mode", ["memory", "pubsub"])
def test_metrics_count_the_jobs_run(stack_factory: Callable[..., Stack], mode: str) -> None:
    """After 6 jobs (5 succeed, 1 fails), /metrics counts them, their calls and region health."""
    only = json.dumps([{"model_id": MODEL, "supported_regions": [REGIONS[0]]}])
    stack = stack_factory(mode, MODEL_CONFIG=only, standin={"default": {"script": [400]}})
    job_ids = [stack.submit_ok(unique("m")) for _ in range(6)]
    views = [stack.wait(job_id) for job_id in job_ids]
    assert sorted(v["status"] for v in views) == ["failed"] + ["succeeded"] * 5
    ingress = stack.http.get(f"{stack.ingress.url}/metrics").text
    assert metric_value(ingress, "dispatcher_jobs_total", state="accepted") == 6
    executor = stack.worker if stack.worker is not None else stack.ingress
    text = stack.http.get(f"{executor.url}/metrics").text
    assert metric_value(text, "dispatcher_jobs_total", state="succeeded") == 5
    assert metric_value(text, "dispatcher_jobs_total", state="failed") == 1
    assert (
        metric_value(text, "dispatcher_upstream_calls_total", region=REGIONS[0], outcome="200") == 5
    )
    assert (
        metric_value(text, "dispatcher_upstream_calls_total", region=REGIONS[0], outcome="400") == 1
    )
    assert metric_value(text, "dispatcher_upstream_latency_seconds_count", region=REGIONS[0]) == 6
    assert metric_value(text, "dispatcher_region_breaker_state", region=REGIONS[0]) == 0


def test_logs_are_json_with_trace_and_job_id_from_ingress_to_worker(
    stack_factory: Callable[..., Stack],
) -> None:
    """Every log line is JSON with severity and message; a job's lines carry its id and trace."""
    stack = stack_factory("pubsub")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = stack.submit(
        prompt(unique("traced")),
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    job_id = response.json()["job_id"]
    stack.wait(job_id)
    assert stack.worker is not None
    trace = f"projects/{PROJECT}/traces/{trace_id}"
    for process in (stack.ingress, stack.worker):
        lines = [
            json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")
        ]
        assert lines and all("severity" in line and "message" in line for line in lines)
        about_job = [line for line in lines if line.get("job_id") == job_id]
        assert about_job, f"no line about the job in the {process} log"
        assert all(line.get("logging.googleapis.com/trace") == trace for line in about_job)
