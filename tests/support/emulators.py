"""The official Firestore and Pub/Sub emulators as real processes on loopback.

Each emulator is ``gcloud beta emulators KIND start`` on a free 127.0.0.1 port, in its
own process group (gcloud starts a JVM as a child, and only a group signal is sure to
reach it), logging to a file, and ready when ``GET /`` answers ``Ok``.

Measured on the 2-core development machine (gcloud 528.0.0, OpenJDK 17), from spawn to
the first ``Ok``: Firestore about 3.5-4 s, Pub/Sub about 2.5 s; both stop within 0.1 s
of SIGTERM. ``START_TIMEOUT_S`` leaves a wide margin for a loaded CI machine.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import httpx

from tests.support.processes import (
    BIND_ATTEMPTS,
    base_child_env,
    free_port,
    is_bind_failure,
    kill_process_group,
    spawn_logged,
    stop_process_group,
    wait_until_ready,
)

__all__ = [
    "Emulator",
    "EmulatorKind",
    "emulators_unavailable_reason",
    "free_port",
    "reset_firestore",
]

EmulatorKind = Literal["firestore", "pubsub"]

START_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 10.0
_HOST_ENV: Final[dict[EmulatorKind, str]] = {
    "firestore": "FIRESTORE_EMULATOR_HOST",
    "pubsub": "PUBSUB_EMULATOR_HOST",
}
# What must exist under SDK_ROOT for each piece; the same files `gcloud components
# install` lays down, and the Debian packages (google-cloud-cli-*-emulator) too.
_REQUIRED_SDK_PATHS: Final = (
    ("beta", Path(".install/beta.manifest")),
    (
        "cloud-firestore-emulator",
        Path("platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"),
    ),
    ("pubsub-emulator", Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")),
)
_INSTALL_HINT: Final = (
    "install the Google Cloud SDK and "
    "`gcloud components install beta cloud-firestore-emulator pubsub-emulator` "
    "(or the Debian packages google-cloud-cli-firestore-emulator and "
    "google-cloud-cli-pubsub-emulator), plus Java 17 or later"
)


def _sdk_root(gcloud: str) -> Path | None:
    # Cheap path first: the `gcloud` on PATH is (a link to) SDK_ROOT/bin/gcloud. Asking
    # `gcloud info` costs about 1.8 s of Python start-up, and `gcloud components list`
    # wants the network, so it is only the fallback for unusual layouts.
    resolved = Path(gcloud).resolve()
    if resolved.parent.name == "bin" and (resolved.parent.parent / "platform").is_dir():
        return resolved.parent.parent
    try:
        completed = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            env=base_child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    root = completed.stdout.strip()
    return Path(root) if root else None


@functools.cache
def emulators_unavailable_reason() -> str | None:
    """Say why the emulators cannot run here, or None when they can.

    Checks, without network and in milliseconds, that ``gcloud`` and ``java`` are on
    PATH and that the ``beta``, ``cloud-firestore-emulator`` and ``pubsub-emulator``
    components are installed. The answer is cached for the process.

    Returns:
        None when both emulators can be started, otherwise a reason for ``pytest.skip``.
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return f"gcloud not found on PATH; {_INSTALL_HINT}"
    if shutil.which("java") is None:
        return "java not found on PATH; the emulators need a Java 17+ runtime on PATH"
    sdk_root = _sdk_root(gcloud)
    if sdk_root is None:
        return f"could not find the Google Cloud SDK root for {gcloud}; {_INSTALL_HINT}"
    missing = [name for name, path in _REQUIRED_SDK_PATHS if not (sdk_root / path).exists()]
    if missing:
        return (
            f"gcloud component(s) {', '.join(missing)} not installed under {sdk_root}; "
            f"{_INSTALL_HINT}"
        )
    return None


@dataclass(eq=False)
class Emulator:
    """A running emulator, ended by process group.

    Attributes:
        kind: Which emulator.
        host_port: ``127.0.0.1:PORT``, the value clients take from the environment.
        process: The gcloud process (group leader; the JVM is in its group).
        log_path: Where the emulator's output goes.
    """

    kind: EmulatorKind
    host_port: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: Path

    @classmethod
    def start(cls, kind: EmulatorKind, project: str, log_dir: Path) -> Emulator:
        """Start an emulator on a free loopback port and wait until it answers ``Ok``.

        Args:
            kind: ``"firestore"`` or ``"pubsub"``.
            project: The project id the tests use (set as gcloud's core/project).
            log_dir: Directory for the log file (and Pub/Sub's data directory).

        Returns:
            The ready emulator.

        Raises:
            RuntimeError: The emulators are unavailable, or the emulator exited or was
                not ready within ``START_TIMEOUT_S``; includes the tail of its log.
        """
        reason = emulators_unavailable_reason()
        if reason is not None:
            # Never let gcloud offer to install a missing component: that needs network.
            raise RuntimeError(reason)
        log_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, BIND_ATTEMPTS + 1):
            host_port = f"127.0.0.1:{free_port()}"
            command = ["gcloud", "beta", "emulators", kind, "start", f"--host-port={host_port}"]
            if kind == "pubsub":
                # The default data dir is shared (~/.config/gcloud/emulators/pubsub), so
                # concurrent runs would overwrite each other's env.yaml. gcloud does not
                # create it and fails with "Unable to write file [.../env.yaml]".
                data_dir = log_dir / f"pubsub-data-{host_port.rpartition(':')[2]}"
                data_dir.mkdir(parents=True, exist_ok=True)
                command.append(f"--data-dir={data_dir}")
            log_path = log_dir / f"{kind}-emulator-{host_port.rpartition(':')[2]}.log"
            started = time.monotonic()
            emulator = cls(
                kind=kind,
                host_port=host_port,
                process=spawn_logged(
                    command,
                    env=base_child_env({"CLOUDSDK_CORE_PROJECT": project}),
                    log_path=log_path,
                ),
                log_path=log_path,
            )
            try:
                wait_until_ready(
                    f"http://{host_port}/",
                    emulator.process,
                    log_path=log_path,
                    timeout=START_TIMEOUT_S,
                    is_ready=lambda response: "Ok" in response.text,
                    what=f"{kind} emulator",
                )
            except RuntimeError:
                kill_process_group(emulator.process)
                # free_port() only reserves the port briefly; if another process took it
                # before the JVM bound it, a fresh port is worth another try.
                if attempt < BIND_ATTEMPTS and is_bind_failure(log_path):
                    continue
                raise
            with log_path.open("a", encoding="utf-8") as log_file:
                log_file.write(f"=== ready after {time.monotonic() - started:.1f} s\n")
            return emulator
        raise AssertionError("unreachable: the loop returns or raises")

    def env(self) -> dict[str, str]:
        """Return the variable a Google client reads to use this emulator.

        Returns:
            ``{"FIRESTORE_EMULATOR_HOST": host_port}`` or ``{"PUBSUB_EMULATOR_HOST": ...}``.
        """
        return {_HOST_ENV[self.kind]: self.host_port}

    def stop(self) -> None:
        """SIGTERM the process group, wait up to 10 s, then SIGKILL it; no JVM survives."""
        stop_process_group(self.process, timeout=STOP_TIMEOUT_S)


def reset_firestore(host_port: str, project: str) -> None:
    """Delete every document in the emulator's ``(default)`` database of ``project``.

    Args:
        host_port: The emulator's ``HOST:PORT``.
        project: The project whose documents go.

    Raises:
        AssertionError: The emulator did not answer 200.
    """
    url = f"http://{host_port}/emulator/v1/projects/{project}/databases/(default)/documents"
    # trust_env=False: a proxy from the environment must not capture loopback.
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        response = client.delete(url)
    # An explicit raise rather than `assert`, which `python -O` would drop.
    if response.status_code != 200:
        raise AssertionError(
            f"resetting Firestore emulator at {url} answered {response.status_code}: "
            f"{response.text[:500]}"
        )


@contextlib.contextmanager
def running_emulators(project: str, log_dir: Path) -> Iterator[tuple[Emulator, Emulator]]:
    """Both emulators, (firestore, pubsub), stopped (by process group) on exit."""
    with contextlib.ExitStack() as stack:
        firestore = Emulator.start("firestore", project, log_dir)
        stack.callback(firestore.stop)
        pubsub = Emulator.start("pubsub", project, log_dir)
        stack.callback(pubsub.stop)
        yield firestore, pubsub
