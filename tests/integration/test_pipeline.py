"""The core pipeline, end to end, in all three modes, with real processes.

Mode 1 needs nothing but Python; modes 2 and 3 run on the official emulators,
with Pub/Sub pushing over HTTP to the real worker.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from google.cloud import firestore

from tests.integration.conftest import MODES
from tests.support.processes import ServiceProcess
from tests.support.stack import MODEL, REGIONS, Stack, prompt, unique

pytestmark = pytest.mark.integration
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.mark.parametrize("mode", MODES)
def test_submit_poll_succeeds_with_the_stand_in_text(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """POST /generate answers 202 at once; polling reaches succeeded with Vertex's response."""
    stack = stack_factory(mode)
    text = unique("hello")
    response = stack.submit(prompt(text))
    assert response.status_code == 202
    accepted = response.json()
    assert set(accepted) == {"job_id", "status", "model", "region", "tier"}
    assert accepted["status"] == "pending"
    assert accepted["model"] == MODEL
    assert accepted["region"] in REGIONS
    assert response.headers["location"] == f"/jobs/{accepted['job_id']}"
    assert len(accepted["job_id"]) >= 22
    view = stack.wait(accepted["job_id"])
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert view["region"] == accepted["region"]
    assert RFC3339.match(view["created_at"]) and RFC3339.match(view["updated_at"])
    reply = view["result"]["candidates"][0]["content"]["parts"][0]["text"]
    assert reply == f"stand-in reply from {accepted['region']}: {text}"
    assert "error" not in view


@pytest.mark.parametrize("mode", MODES)
def test_regions_are_assigned_round_robin(stack_factory: Callable[..., Stack], mode: str) -> None:
    """Successive requests to one ingress get the model's regions in turn from an offset."""
    stack = stack_factory(mode)
    regions = [stack.submit(prompt(f"rr{i}")).json()["region"] for i in range(7)]
    start = REGIONS.index(regions[0])
    assert regions == [REGIONS[(start + i) % len(REGIONS)] for i in range(7)]


@pytest.mark.parametrize("mode", MODES)
def test_transient_errors_then_success_count_attempts(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """A 503 then a 429 are retried and the job succeeds; attempts counts all three calls."""
    only_region = json.dumps([{"model_id": MODEL, "supported_regions": [REGIONS[0]]}])
    stack = stack_factory(
        mode, standin={"default": {"script": [503, 429]}}, MODEL_CONFIG=only_region
    )
    view = stack.wait(stack.submit_ok(unique("flaky")))
    assert view["status"] == "succeeded"
    assert view["attempts"] == 3
    assert stack.standin_stats()["total_calls"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_permanent_error_fails_after_one_call(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """A 400 from Vertex fails the job at once with Vertex's own code, status and message."""
    stack = stack_factory(mode, standin={"default": {"status": 400}})
    view = stack.wait(stack.submit_ok(unique("bad")))
    assert view["status"] == "failed"
    assert view["attempts"] == 1
    assert view["error"]["code"] == 400
    assert view["error"]["status"] == "INVALID_ARGUMENT"
    assert view["error"]["message"]
    assert "result" not in view
    assert stack.standin_stats()["total_calls"] == 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1]", 400, "JSON object"),
        (b"{}", 400, "contents"),
        (b'{"contents": [{"parts": []}]}', 400, "contents[0].parts"),
        (b'{"contents": [{"parts": [{"text": 1}]}]}', 400, "contents[0].parts[0].text"),
        (b'{"contents": [{"parts": [{"text": "a"}]}], "model": "nope"}', 400, "model"),
        (
            b'{"contents": [{"parts": [{"text": "a"}]}], '
            b'"cachedContent": "projects/p/locations/mars-north1/cachedContents/1"}',
            400,
            "cachedContent",
        ),
    ],
)
def test_bad_input_is_refused_in_the_error_shape(
    stack_factory: Callable[..., Stack], body: bytes, status: int, words: str
) -> None:
    """Each bad body gets its status and a message naming the problem, and creates no job."""
    stack = stack_factory("memory")
    response = stack.submit(None, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status
    assert error["status"] == "INVALID_ARGUMENT"
    assert words in error["message"]
    assert stack.standin_stats()["total_calls"] == 0


def test_oversized_body_gets_413(stack_factory: Callable[..., Stack]) -> None:
    """A body over MAX_REQUEST_BYTES is refused with 413 before it is stored."""
    stack = stack_factory("memory", MAX_REQUEST_BYTES="2048")
    response = stack.submit(prompt("x" * 4096))
    assert response.status_code == 413
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "2048" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/jobs/AAAAAAAAAAAAAAAAAAAAAA", 404),
        ("GET", "/jobs/not-an-id", 404),
        ("GET", "/nowhere", 404),
        ("DELETE", "/generate", 405),
    ],
)
def test_unknown_things_answer_in_the_error_shape(
    stack_factory: Callable[..., Stack], method: str, path: str, status: int
) -> None:
    """Unknown jobs, routes and methods answer with the documented error body."""
    stack = stack_factory("memory")
    response = stack.http.request(method, f"{stack.ingress.url}{path}")
    assert response.status_code == status
    assert response.json()["error"]["code"] == status


def test_healthz(stack_factory: Callable[..., Stack]) -> None:
    """GET /healthz answers 200."""
    stack = stack_factory("memory")
    assert stack.http.get(f"{stack.ingress.url}/healthz").status_code == 200


@pytest.mark.parametrize("mode", ["firestore", "pubsub"])
def test_two_ingress_instances_answer_for_the_same_job(
    stack_factory: Callable[..., Stack], mode: str
) -> None:
    """A job submitted to one ingress is readable, finished, from another."""
    stack = stack_factory(mode, ingresses=2)
    job_id = stack.submit_ok(unique("shared"), ingress=0)
    view = stack.wait(job_id, ingress=1)
    assert view["status"] == "succeeded"
    assert stack.job(job_id, ingress=0)["status"] == "succeeded"


def push_envelope(job_id: str, attempt: int | None = None) -> dict[str, object]:
    data = base64.b64encode(json.dumps({"job_id": job_id}).encode()).decode()
    envelope: dict[str, object] = {
        "message": {"data": data, "messageId": "1", "attributes": {"job_id": job_id}},
        "subscription": "projects/test-project/subscriptions/manual",
    }
    if attempt is not None:
        envelope["deliveryAttempt"] = attempt
    return envelope


def test_duplicate_push_does_not_call_vertex_again(stack_factory: Callable[..., Stack]) -> None:
    """Re-pushing a finished job's message to the worker acknowledges without a Vertex call."""
    stack = stack_factory("pubsub")
    text = unique("once")
    job_id = stack.submit_ok(text)
    assert stack.wait(job_id)["status"] == "succeeded"
    assert stack.worker is not None
    again = stack.http.post(f"{stack.worker.url}/", json=push_envelope(job_id))
    assert again.status_code == 200
    assert again.json()["status"] == "succeeded"
    assert stack.standin_stats()["calls_by_text"][text] == 1


def test_concurrent_duplicate_pushes_call_vertex_once(stack_factory: Callable[..., Stack]) -> None:
    """The same message pushed twice at once (plus Pub/Sub's own push) calls Vertex once."""
    stack = stack_factory("pubsub", standin={"default": {"latency_s": 1.0}})
    text = unique("twice")
    job_id = stack.submit_ok(text)
    assert stack.worker is not None
    url = f"{stack.worker.url}/"
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda _: httpx.post(url, json=push_envelope(job_id), timeout=30), range(2))
        )
    assert all(a.status_code in (200, 503) for a in answers)
    assert stack.wait(job_id)["status"] == "succeeded"
    assert stack.standin_stats()["calls_by_text"][text] == 1


def test_malformed_push_is_acknowledged(stack_factory: Callable[..., Stack]) -> None:
    """A push body the worker can never use is acknowledged (2xx), not redelivered forever."""
    stack = stack_factory("pubsub")
    assert stack.worker is not None
    for body in (b"not json", b"{}", json.dumps(push_envelope("../../x")).encode()):
        response = stack.http.post(f"{stack.worker.url}/", content=body)
        assert 200 <= response.status_code < 300


def test_publish_failure_answers_503_and_leaves_nothing_pending(
    stack_factory: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When the topic is missing, POST answers 503 and the stored record is failed, not pending."""
    stack = stack_factory("pubsub")
    # A second ingress publishing to a topic that does not exist.
    env = {**stack.env, "PUBSUB_TOPIC": unique("missing-topic")}
    stack.ingresses.append(ServiceProcess.start("ingress", env, log_dir=tmp_path))
    response = stack.submit(prompt("lost?"), ingress=1)
    assert response.status_code == 503
    assert response.json()["error"]["status"] == "UNAVAILABLE"
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", env["FIRESTORE_EMULATOR_HOST"])
    client = firestore.Client(project="test-project")
    docs: list[dict[str, object]] = []
    for snapshot in client.collection(env["FIRESTORE_COLLECTION"]).stream():
        doc = snapshot.to_dict()
        assert doc is not None  # a streamed snapshot exists
        docs.append(doc)
    assert docs, "the ingress stores the record before publishing"
    assert {d["status"] for d in docs} == {"failed"}
