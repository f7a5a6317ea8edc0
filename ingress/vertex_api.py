"""A Vertex-compatible route, so existing clients (the google-genai SDK, plain REST) work.

`POST /{v1|v1beta1}/projects/P/locations/L/publishers/google/models/M:generateContent`
takes Vertex's request and answers synchronously with Vertex's response JSON, or
Vertex's error body, while the dispatcher picks the region, retries and fails over
behind it: the call is a durable job like any other, awaited by the request. The
project and location in the path are accepted as given; the dispatcher decides
where the call runs (any region configured for the model).

`:streamGenerateContent` is answered too, but not incrementally: the whole response
arrives as one chunk (one SSE event with `?alt=sse`, else a one-element JSON array),
because a durable job stores a finished response, not a token stream.
"""

from __future__ import annotations

import json
import logging

from starlette.requests import Request
from starlette.responses import Response

from dispatcher.http import HttpError, json_response
from dispatcher.jobs import Job, JobStatus
from dispatcher.runtime import Runtime
from ingress.jobs_api import accept_job

log = logging.getLogger("ingress")
API_VERSIONS = ("v1", "v1beta1")
ACTIONS = ("generateContent", "streamGenerateContent")
JOB_HEADER = "X-Dispatcher-Job-Id"


async def vertex_generate(request: Request) -> Response:
    """The Vertex-compatible generateContent (and one-chunk streamGenerateContent)."""
    runtime: Runtime = request.app.state.runtime
    version = request.path_params["version"]
    model, _, action = request.path_params["model_action"].partition(":")
    if version not in API_VERSIONS or action not in ACTIONS:
        raise HttpError(404, f"no route POST {request.url.path[:200]}")
    if model not in runtime.settings.models:
        raise HttpError(
            404,
            f"Publisher Model `{model}` is not served by this dispatcher "
            f"(configured: {', '.join(runtime.settings.models)})",
        )
    job = (await accept_job(request, model_override=model)).job
    finished = (
        job
        if job.status.is_terminal
        else await runtime.watcher.wait(job.job_id, runtime.settings.sync_timeout_s)
    )
    headers = {JOB_HEADER: job.job_id}
    if finished is None:
        raise HttpError(
            504,
            f"job {job.job_id} did not finish within {runtime.settings.sync_timeout_s:g} s; "
            f"it goes on: GET /jobs/{job.job_id}",
            headers=headers,
        )
    if finished.status is not JobStatus.SUCCEEDED:
        return _failure(finished, headers)
    assert finished.result is not None
    if action == "generateContent":
        return json_response(finished.result, 200, headers)
    if request.query_params.get("alt") == "sse":
        event = f"data: {json.dumps(finished.result, separators=(',', ':'))}\r\n\r\n"
        return Response(event, 200, headers, media_type="text/event-stream")
    return json_response([finished.result], 200, headers)


def _failure(job: Job, headers: dict[str, str]) -> Response:
    if job.status is JobStatus.CANCELLED:
        return HttpError(
            409, f"job {job.job_id} was cancelled", headers=headers, name="ABORTED"
        ).response()
    error = job.error
    assert error is not None
    status = error.code if 400 <= error.code <= 599 else 500
    return HttpError(status, error.message, headers=headers, name=error.status).response()
