"""The harness itself: emulators and service processes start, answer and leave nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.emulators import (
    Emulator,
    EmulatorKind,
    emulators_unavailable_reason,
    reset_firestore,
)
from tests.support.processes import ServiceProcess, group_alive

pytestmark = pytest.mark.integration

PROJECT = "harness-project"
KINDS: tuple[EmulatorKind, ...] = ("firestore", "pubsub")
ECHO_MODULE = "harness_echo_service"

# A stand-in service: /healthz, plus views of its own env, argv and children, and knobs
# (environment variables) to fail at start, ignore SIGTERM or spawn a grandchild.
ECHO_SOURCE = textwrap.dedent(
    """
    import json
    import os
    import signal
    import subprocess
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    CHILDREN = []


    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            views = {
                "/healthz": {"ok": True},
                "/env": dict(os.environ),
                "/argv": sys.argv[1:],
                "/children": CHILDREN,
            }
            if self.path not in views:
                self.send_error(404)
                return
            body = json.dumps(views[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass


    def main():
        if os.environ.get("FAIL_AT_START"):
            print("boom: told to fail at start", flush=True)
            sys.exit(3)
        if os.environ.get("SPAWN_CHILD"):
            CHILDREN.append(subprocess.Popen(["sleep", "300"]).pid)
        if os.environ.get("IGNORE_SIGTERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server = ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler)
        print(f"echo service pid {os.getpid()} on port {os.environ['PORT']}", flush=True)
        server.serve_forever()


    main()
    """
)


def _skip_without_emulators() -> None:
    reason = emulators_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _jvm_pids(emulator: Emulator) -> list[int]:
    """Pids of processes whose command line binds this emulator's port (the JVM among them)."""
    port = emulator.host_port.rpartition(":")[2]
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--port={port}( |$)"], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in found.stdout.split()]


def _get_json(url: str) -> Any:
    response = httpx.get(url, trust_env=False, timeout=5.0)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def firestore_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One Firestore emulator for the module's read-only checks."""
    _skip_without_emulators()
    emulator = Emulator.start("firestore", PROJECT, tmp_path_factory.mktemp("firestore"))
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One Pub/Sub emulator for the module's read-only checks."""
    _skip_without_emulators()
    emulator = Emulator.start("pubsub", PROJECT, tmp_path_factory.mktemp("pubsub"))
    yield emulator
    emulator.stop()


@pytest.fixture
def echo_env(tmp_path: Path) -> dict[str, str]:
    """Service settings that put the echo module (written into tmp_path) on PYTHONPATH."""
    (tmp_path / f"{ECHO_MODULE}.py").write_text(ECHO_SOURCE)
    return {"PYTHONPATH": str(tmp_path)}


@pytest.fixture
def echo_factory(tmp_path: Path, echo_env: dict[str, str]) -> Iterator[Any]:
    """Starts echo services with extra settings; kills any still running afterwards."""
    started: list[ServiceProcess] = []

    def make(**overrides: Any) -> ServiceProcess:
        extra_env = overrides.pop("env", {})
        service = ServiceProcess.start(
            ECHO_MODULE, {**echo_env, **extra_env}, log_dir=tmp_path / "logs", **overrides
        )
        started.append(service)
        return service

    yield make
    for service in started:
        service.kill()


@pytest.mark.parametrize(
    ("tools_on_path", "expected_start"),
    [((), "gcloud not found on PATH"), (("gcloud",), "java not found on PATH")],
)
def test_unavailable_reason_names_the_missing_tool(
    tools_on_path: tuple[str, ...],
    expected_start: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The skip reason names the first missing tool rather than failing later."""
    for tool in tools_on_path:
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} not installed here, so it cannot be offered alone")
        (tmp_path / tool).symlink_to(real)
    monkeypatch.setenv("PATH", str(tmp_path))
    emulators_unavailable_reason.cache_clear()
    try:
        reason = emulators_unavailable_reason()
    finally:
        emulators_unavailable_reason.cache_clear()  # later callers see the real PATH
    assert reason is not None
    assert reason.startswith(expected_start)


@pytest.mark.parametrize("kind", KINDS)
def test_emulator_answers_ok(kind: EmulatorKind, request: pytest.FixtureRequest) -> None:
    """A started emulator answers `Ok` on GET / at its host_port, which env() exports."""
    emulator: Emulator = request.getfixturevalue(f"{kind}_emulator")
    response = httpx.get(f"http://{emulator.host_port}/", trust_env=False, timeout=5.0)
    assert response.status_code == 200
    assert "Ok" in response.text
    expected_var = "FIRESTORE_EMULATOR_HOST" if kind == "firestore" else "PUBSUB_EMULATOR_HOST"
    assert emulator.env() == {expected_var: emulator.host_port}


def test_reset_firestore_deletes_documents(
    firestore_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reset_firestore removes a document written by the real Firestore client."""
    from google.cloud import firestore

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host_port)
    client = firestore.Client(project=PROJECT)
    try:
        document = client.collection("harness").document(uuid.uuid4().hex)
        document.set({"written": True})
        assert document.get().exists

        reset_firestore(firestore_emulator.host_port, PROJECT)

        assert not document.get().exists
    finally:
        client.close()  # untyped in google-cloud-firestore: tests allow untyped calls


@pytest.mark.parametrize("kind", KINDS)
def test_emulator_stop_leaves_no_process(kind: EmulatorKind, tmp_path: Path) -> None:
    """stop() ends gcloud and its JVM: nothing in the group, no process on the port."""
    _skip_without_emulators()
    if shutil.which("pgrep") is None:
        pytest.skip("pgrep not found on PATH (Debian package procps)")
    emulator = Emulator.start(kind, PROJECT, tmp_path)
    try:
        assert _jvm_pids(emulator), "the emulator's JVM should be visible while running"
    finally:
        emulator.stop()

    assert emulator.process.returncode is not None
    assert not group_alive(emulator.process.pid)
    assert _jvm_pids(emulator) == []


def test_service_starts_and_answers_health(echo_factory: Any) -> None:
    """A service is started on loopback with its port and pid, healthy at url/healthz."""
    service: ServiceProcess = echo_factory()
    assert service.url == f"http://127.0.0.1:{service.port}"
    assert service.pid == service.process.pid
    assert _get_json(f"{service.url}/healthz") == {"ok": True}
    assert f"on port {service.port}" in service.log_text()


def test_service_env_is_minimal_and_network_free(
    echo_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child gets HOST, PORT, its settings and the no-metadata vars, not our whole env."""
    monkeypatch.setenv("HARNESS_LEAK_CHECK", "must-not-leak")
    service: ServiceProcess = echo_factory(env={"SERVICE_SETTING": "42"})
    child_env = _get_json(f"{service.url}/env")
    assert child_env["HOST"] == "127.0.0.1"
    assert child_env["PORT"] == str(service.port)
    assert child_env["SERVICE_SETTING"] == "42"
    assert child_env["PYTHONUNBUFFERED"] == "1"
    assert child_env["NO_GCE_CHECK"] == "True"
    assert child_env["GCE_METADATA_HOST"] == "127.0.0.1:9"
    assert child_env["CLOUDSDK_CORE_DISABLE_PROMPTS"] == "1"
    assert "HARNESS_LEAK_CHECK" not in child_env


def test_service_args_and_port_flag(echo_factory: Any) -> None:
    """args reach the module's argv, and port_flag appends --port PORT."""
    service: ServiceProcess = echo_factory(args=["--host", "127.0.0.1"], port_flag=True)
    assert _get_json(f"{service.url}/argv") == ["--host", "127.0.0.1", "--port", str(service.port)]


def test_service_that_exits_at_start_raises_with_log(echo_factory: Any) -> None:
    """A service that exits before it is healthy raises RuntimeError quoting its log."""
    with pytest.raises(RuntimeError, match="boom: told to fail at start"):
        echo_factory(env={"FAIL_AT_START": "1"})


def test_service_not_healthy_in_time_raises(echo_factory: Any) -> None:
    """A service whose health path never answers 200 raises RuntimeError at the timeout."""
    with pytest.raises(RuntimeError, match="not ready"):
        echo_factory(health_path="/missing", ready_timeout=1.0)


def test_terminate_ends_whole_group_gracefully(echo_factory: Any) -> None:
    """terminate() returns the service's own exit code and ends its children too."""
    service: ServiceProcess = echo_factory(env={"SPAWN_CHILD": "1"})
    [child_pid] = _get_json(f"{service.url}/children")
    assert os.getpgid(child_pid) == service.pid

    assert service.terminate() == 0

    assert not group_alive(service.pid)


def test_terminate_escalates_to_sigkill(echo_factory: Any) -> None:
    """A service that ignores SIGTERM is SIGKILLed once the timeout passes."""
    service: ServiceProcess = echo_factory(env={"IGNORE_SIGTERM": "1"})
    assert service.terminate(timeout=0.5) == -9
    assert not group_alive(service.pid)


def test_kill_ends_service_at_once(echo_factory: Any) -> None:
    """kill() SIGKILLs the group and the port stops answering."""
    service: ServiceProcess = echo_factory()
    assert service.kill() == -9
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{service.url}/healthz", trust_env=False, timeout=2.0)


def test_restart_keeps_port_and_env(echo_factory: Any) -> None:
    """restart() brings up a new process on the same port with the same environment."""
    service: ServiceProcess = echo_factory(env={"SERVICE_SETTING": "kept"})
    first_pid, port = service.pid, service.port

    service.restart()

    assert service.pid != first_pid
    assert service.port == port
    assert _get_json(f"{service.url}/env")["SERVICE_SETTING"] == "kept"
    assert service.log_text().count("echo service pid") == 2
